"""The schedule-space registry and tuning database (kiln.codegen.schedules)."""

from __future__ import annotations

import json

import pytest

from kiln.codegen import schedules as sch
from kiln.codegen.targets import cpu
from kiln.compiler.errors import KilnError

TOY = sch.Space(
    kernel="test.toy",
    knobs=(sch.Knob("tile", (1, 2, 4, 8)), sch.Knob("unroll", (False, True))),
    default=lambda shape, target: {"tile": 4 if shape["n"] % 4 == 0 else 1, "unroll": False},
    valid=lambda shape, c, target: shape["n"] % c["tile"] == 0,
    dynamic=("m",))


@pytest.fixture(autouse=True)
def toy_space():
    sch.register(TOY)
    yield
    sch.SPACES.pop(TOY.kernel)


def test_configs_start_with_the_default_and_respect_validity():
    configs = TOY.configs({"n": 12, "m": 5}, cpu("znver4"))
    assert configs[0] == {"tile": 4, "unroll": False}
    assert {c["tile"] for c in configs} == {1, 2, 4}  # 8 does not divide 12
    assert len(configs) == len({json.dumps(c, sort_keys=True) for c in configs}) == 6


def test_bucket_rounds_dynamic_dims_up_to_a_power_of_two():
    assert sch.bucket({"n": 12, "m": 300}, ("m",)) == "m=512,n=12"
    assert sch.bucket({"n": 12, "m": 300}) == "m=300,n=12"


def test_pick_prefers_the_database_and_records_every_choice(tmp_path):
    target = cpu("znver4", threads=2)
    db = sch.TuningDB(sch.target_key(target))
    db.record("test.toy", "m=512,n=12", {"tile": 2, "unroll": True}, 1.0, 2.0)
    db.save(tmp_path / "t.json")
    loaded = sch.TuningDB.load(tmp_path / "t.json").for_target(target)
    s = sch.Schedules(target, loaded)
    assert s.pick("test.toy", {"n": 12, "m": 400}) == {"tile": 2, "unroll": True}
    assert s.pick("test.toy", {"n": 16, "m": 1}) == {"tile": 4, "unroll": False}
    assert [(c["shape"], c["source"]) for c in s.manifest()] == [
        ("m=1,n=16", "default"), ("m=512,n=12", "tuned")]


def test_a_foreign_or_stale_database_is_ignored_with_one_warning(tmp_path):
    db = sch.TuningDB(sch.target_key(cpu("znver4", threads=2)))
    with pytest.warns(UserWarning, match="arch 'znver4' != 'skylake-avx512'"):
        assert db.for_target(cpu("skylake-avx512", threads=2), "t.json") is None
    stale = sch.TuningDB({**db.target, "kiln": "0.0.1"})
    with pytest.warns(UserWarning, match="kiln '0.0.1'"):
        assert stale.for_target(cpu("znver4", threads=2)) is None


@pytest.mark.parametrize("text,match", [
    ("not json", "not a kiln tuning file"),
    ('{"format": 1, "kernel": "packed_linear"}', "format 1"),
    ('{"format": 2}', "without its target"),
])
def test_malformed_tuning_files_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(KilnError, match=match) as e:
        sch.TuningDB.load(path)
    assert "\n" not in str(e.value)


def test_an_entry_outside_its_space_is_refused():
    db = sch.TuningDB({}, {"test.toy": {"n=8": {"config": {"tile": 3, "unroll": False}}}})
    with pytest.raises(KilnError, match="tile=3 is not one of"):
        db.lookup("test.toy", "n=8")


def test_sparse_gemv_candidates_leave_out_four_vector_accumulators():
    """cpu.sparse_linear in decode: the default (one-block panels, two chains) comes first;
    panel width x chains = 4 is never offered (LLVM permutes such an accumulator buffer whole
    every column), and chains that do not divide K fall away."""
    from kiln.codegen import cpu_spaces as cs

    shape = {"phase": "decode", "m": 1, "n": 576, "k": 1536, "capacity": 8000,
             "values": "float32", "bias": False}
    configs = cs.SPARSE_LINEAR.configs(shape, cpu("znver4"))
    amd = cs.SPARSE_GEMV["amd"]
    assert (configs[0]["gemv_nv"], configs[0]["chains"]) == (amd["gemv_nv"], amd["chains"])
    pairs = {(c["gemv_nv"], c["chains"]) for c in configs}
    assert pairs == {(nv, c) for nv in (1, 2, 4) for c in (1, 2, 4) if nv * c != 4}
    odd = cs.SPARSE_LINEAR.configs({**shape, "k": 1535}, cpu("znver4"))
    assert {c["chains"] for c in odd} == {1}


def test_sparse_gemv_prefetch_defaults_by_vendor_and_old_entries_fall_back():
    """The sparse GEMV prefetches its values stream by default on Intel (measured there: 1.26x ->
    1.63x dense decode at 70% zeros) and not on AMD (slower there); a database entry written
    before the knob existed is ignored with one warning (TuningDB.lookup), so the default
    applies instead of a KeyError."""
    from kiln.codegen import cpu_spaces as cs

    shape = {"phase": "decode", "m": 1, "n": 576, "k": 1536, "capacity": 8000,
             "values": "float32", "bias": False}
    intel, amd = cpu("sapphirerapids"), cpu("znver4")
    assert (intel.vendor, amd.vendor, cpu("x86-64-v4").vendor) == ("intel", "amd", "")
    assert (cpu("skylake-avx512").vendor, cpu("neoverse-v2").vendor) == ("intel", "")
    assert cs.SPARSE_LINEAR.default(shape, intel)["prefetch"] == cs.SPARSE_GEMV["intel"][
        "prefetch"] > 0
    intel_gemv = {k: cs.SPARSE_LINEAR.default(shape, intel)[k] for k in ("gemv_nv", "chains")}
    assert intel_gemv == {"gemv_nv": 2, "chains": 4}  # measured there (session 16)
    assert cs.SPARSE_LINEAR.valid(shape, cs.SPARSE_LINEAR.default(shape, intel), intel)
    assert cs.SPARSE_LINEAR.default(shape, amd)["prefetch"] == 0
    assert {c["prefetch"] for c in cs.SPARSE_LINEAR.configs(shape, amd)} == {
        0, 2048, 4096, 8192, 16384}
    old = {k: v for k, v in cs.SPARSE_LINEAR.default(shape, amd).items() if k != "prefetch"}
    db = sch.TuningDB({"kind": "cpu"})
    db.record("cpu.sparse_linear", "k", old, 1.0, 1.0)
    with pytest.warns(UserWarning, match=r"knobs \[.*\], the space now .*'prefetch'"):
        assert db.lookup("cpu.sparse_linear", "k") is None
    prefill = {**shape, "phase": "prefill", "m": 512}
    assert {c["prefetch"] for c in cs.SPARSE_LINEAR.configs(prefill, intel)} == {
        cs.SPARSE_GEMV["intel"]["prefetch"]}
