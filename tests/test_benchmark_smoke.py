"""The layer benchmark runs end to end and writes the promised JSON fields (timings are not asserted)."""

import json

import pytest

from benchmarks import bench_moe_layer


@pytest.mark.slow  # ~30 s of compiles; CI runs it in the slow set
def test_bench_moe_layer_tiny_writes_rows(tmp_path):
    out = tmp_path / "tiny.json"
    assert bench_moe_layer.main(["--preset", "tiny", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    impls = [r["impl"] for r in rows]
    assert (
        impls[0].startswith("dense")
        and any("einsum" in i for i in impls)
        and any("indices" in i for i in impls)
    )
    assert any("grouped" in i for i in impls)
    for row in rows:
        assert "error" not in row, row
        assert {"impl", "ms", "ratio_to_dense", "temp_bytes", "dropless"} <= set(row)
        assert row["ms"] > 0 and row["temp_bytes"] >= 0
