"""The thin runtime: loads an artifact and runs prefill/decode with the TVM runtime only."""
