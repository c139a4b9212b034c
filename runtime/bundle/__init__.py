"""What `kiln package` ships into a bundle beside the runtime: the launcher and its bench."""
