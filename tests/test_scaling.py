"""perf/scaling.py: the communication model's arithmetic (bytes, two-level collectives, overlap)
and its report, against hand computations."""
from __future__ import annotations


import pytest

from perf.common.results_md import markers

@pytest.fixture(scope="module")
def scaling():
    from perf import scaling
    return scaling


def test_collectives_on_one_node_and_across_nodes(scaling):
    GB = 1e9
    # one node: ring over NVLink, 2 (N-1)/N passes for all-reduce, (N-1)/N for gathers
    assert scaling.collective_seconds(4.5 * GB, 8, "all_reduce") == pytest.approx(2 * 7 / 8 * 4.5 / 450)
    assert scaling.collective_seconds(4.5 * GB, 8, "all_gather") == pytest.approx(7 / 8 * 4.5 / 450)
    # 4 nodes: the NVLink part plus 1/8 of the buffer per GPU over its 50 GB/s NIC, ring factor 3/4
    want = 2 * 7 / 8 * 8 / 450 + 2 * 3 / 4 * (8 / 8) / 50
    assert scaling.collective_seconds(8 * GB, 32, "all_reduce") == pytest.approx(want)
    assert scaling.collective_seconds(8 * GB, 1, "all_reduce") == 0.0


def test_overlap_hides_what_the_backward_covers(scaling):
    params, s_img = 100_000_000, 1e-3
    # 8 GPUs x 30 images: 30 ms compute, 20 ms backward; DDP's 0.4 GB fp32 all-reduce takes 1.6 ms: hidden
    c = scaling.step_case(params, 8, "ddp", 30, s_img)
    assert c.compute_s == pytest.approx(0.030)
    assert c.comm_bytes == pytest.approx(2 * 7 / 8 * 4e8)
    last = scaling.collective_seconds(scaling.DDP_BUCKET_BYTES, 8, "all_reduce")
    assert c.exposed_s == pytest.approx(last) and c.efficiency > 0.99
    # 1 image per GPU on 128 GPUs: 0.67 ms of backward cannot hide a multi-node all-reduce
    c = scaling.step_case(params, 128, "ddp", 1, s_img)
    comm = scaling.collective_seconds(4e8, 128, "all_reduce")
    last = scaling.collective_seconds(scaling.DDP_BUCKET_BYTES, 128, "all_reduce")
    assert c.exposed_s == pytest.approx(comm - 2e-3 / 3 + last)
    assert c.efficiency == pytest.approx(1e-3 / (1e-3 + c.exposed_s))
    # FSDP2: bf16 gathers against the forward, the re-gather and the fp32 reduce-scatter against the backward
    f = scaling.step_case(params, 128, "fsdp", 1, s_img)
    gather = scaling.collective_seconds(2e8, 128, "all_gather")
    scatter = scaling.collective_seconds(4e8, 128, "reduce_scatter")
    assert f.comm_s == pytest.approx(2 * gather + scatter)
    assert f.exposed_s == pytest.approx(max(gather - 1e-3 / 3, 0) + max(gather + scatter - 2e-3 / 3, 0))
    assert f.comm_bytes == pytest.approx(127 / 128 * (2 * 2e8 + 4e8))
    with pytest.raises(ValueError, match="mode"):
        scaling.step_case(params, 8, "zero3", 1, s_img)


def test_report_writes_its_block_once(scaling, tmp_path, monkeypatch):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Performance results\n\nkept\n")
    scaling.write_results(md, "table one", "cmd")
    scaling.write_results(md, "table two", "cmd")
    text = md.read_text()
    assert text.count(markers("scaling")[0]) == 1 and "table two" in text and "table one" not in text and "kept" in text
    assert scaling.roofline_seconds_per_image("SiT-XL/2", "h100-sxm", "compile+fusedloss") > 0
    assert scaling.model_params("SiT-B/2", "conv", 768) > 100e6
