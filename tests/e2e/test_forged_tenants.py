"""The forged-tenant attack through the real server (bench/forged_tenants.py, short phases):
with self-declared tenants, a tenant that names itself 12 tenants takes most of the service;
with --tenant-keys the tenant comes from the API key and the honest tenants keep their share."""

from __future__ import annotations

from pathlib import Path

from tests.support import load_bench_script


def test_tenant_keys_defeat_the_forged_tenant_attack(tmp_path: Path) -> None:
    bench = load_bench_script("forged_tenants")
    # Each phase on a fresh server: on one server, a 12-s phase is mostly the transient the
    # phase before left in the fairness counters. After the forged phase, a's keyed share read
    # 0.03-0.14 above its honest one in four fresh-clone CIs (keyed Jain 0.76 against honest
    # 0.90 once); run before it, the forged phase's a share fell to 0.57.
    args = bench.parse_args(["--phase-s", "12", "--warmup-s", "3", "--fresh-server",
                             "--out", str(tmp_path / "forged.json")])  # fmt: skip
    report = bench.measure(args)
    phases = report["phases"]
    # The attack works when tenants are self-declared: the test can fail.
    assert phases["forged_declared"]["shares"]["a"] > 0.6, phases["forged_declared"]
    assert phases["forged_declared"]["jain"] < 0.8, phases["forged_declared"]
    # With tenant keys, a is one tenant again: the keyed phase looks like the honest one, and
    # not like the forged one. The honest phase is the reference, not a fixed share: c's two
    # closed-loop streams are not always backlogged, so even honest tenants split the service
    # unevenly (honest a read 0.49 and 0.39 in two fresh-clone CIs, keyed a 0.52 and 0.53).
    # The benchmark's target (TARGET_JAIN, 0.9) is for its 40-second
    # phases (bench/results/forged-tenants.json).
    honest, forged, keyed = phases["honest"], phases["forged_declared"], phases["forged_keyed"]
    assert keyed["shares"]["a"] < forged["shares"]["a"] - 0.1, phases
    # In 12-second phases a's keyed share has read 0.03 and 0.14 above its honest one (open:
    # carry-over from the forged phase is one candidate); the 40-second benchmark reads Jain 0.958.
    assert abs(keyed["shares"]["a"] - honest["shares"]["a"]) <= 0.2, phases
    assert keyed["jain"] > forged["jain"] + 0.1, phases
    assert keyed["jain"] >= min(0.8, honest["jain"] - 0.1), phases
    # No tenant is starved under keys. The floor is relative to the honest phase's smallest
    # share, as the Jain check is: a fresh-clone CI read keyed c 0.115 against a fixed 0.12
    # (a 0.57, b 0.31), with every honest-relative check passing.
    assert min(keyed["shares"].values()) > min(0.12, min(honest["shares"].values()) - 0.08), phases
    assert report["forged_tenant_jain"] == keyed["jain"]
