"""Reference adapters trained as Ray tasks are the ones sequential training gives (same seeds, same halves)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, FAST, assert_one_line_error, invoke_cli, run_cli
from privlora.audit.reference_pool import ReferenceJob, ReferencePool
from privlora.audit.references import MANIFEST, ensure_references
from privlora.audit.runner import load_run
from privlora.data.splits import Splits
from privlora.errors import UserError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The reference tests' tiniest run: demo-plain, 2 steps of batch 4."""
    out = tmp_path_factory.mktemp("pool") / "run"
    proc = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "2", "--batch-size", "4",
                   "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    return load_run(out)


def _tensors(directory):
    return load_file(str(directory / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow  # ~40–60 s on 2 shared cores: 4 tiny trainings and a local Ray start
def test_ray_references_equal_sequential_ones(tiny_run, tmp_path, capsys):
    import ray

    population = [*tiny_run.members.ids, *tiny_run.held_out.ids]
    start = time.perf_counter()
    seq = ensure_references(tiny_run.config, population, k=2, directory=tmp_path / "seq", seed=3)
    sequential_s = time.perf_counter() - start
    start = time.perf_counter()
    par = ensure_references(tiny_run.config, population, k=2, directory=tmp_path / "ray", seed=3,
                            pool=ReferencePool(workers=2))
    ray_s = time.perf_counter() - start
    assert not ray.is_initialized()  # the pool started that Ray, so it stopped it
    assert par.inside == seq.inside and par.recipe == seq.recipe
    manifest = json.loads((tmp_path / "seq" / MANIFEST).read_text())
    assert json.loads((tmp_path / "ray" / MANIFEST).read_text()) == manifest
    worst = 0.0
    for k in range(2):
        a, b = _tensors(tmp_path / "seq" / f"ref-{k}"), _tensors(tmp_path / "ray" / f"ref-{k}")
        assert a.keys() == b.keys() and a
        worst = max(worst, *(float((a[n] - b[n]).abs().max()) for n in a))
        assert json.loads((tmp_path / "ray" / f"ref-{k}" / "splits.json").read_text()) == \
            json.loads((tmp_path / "seq" / f"ref-{k}" / "splits.json").read_text())
    # the two references differ from each other (distinct seeds and halves): equality above is not vacuous
    one, two = _tensors(tmp_path / "seq" / "ref-0"), _tensors(tmp_path / "seq" / "ref-1")
    assert any(not torch.equal(one[n], two[n]) for n in one)
    with capsys.disabled():
        print(f"\nreferences: sequential {sequential_s:.1f} s, local Ray {ray_s:.1f} s, max |Δ| {worst:g}")
    assert worst == 0.0


@pytest.mark.slow  # ~30 s on 2 shared cores: a local Ray start
def test_failed_ray_task_names_the_reference_and_leaves_a_foreign_ray_running(tiny_run, tmp_path):
    import ray

    config = tiny_run.config.model_copy(update={
        "out": tmp_path / "ref-0", "quiet": True,
        "data": tiny_run.config.data.model_copy(update={"source": str(tmp_path / "no-such-folder")})})
    job = ReferenceJob(index=0, of=2, config=config, splits=Splits(
        members=list(tiny_run.members.ids), aux=[], eval=[], source=config.data.source, seed=0))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(UserError, match=r"reference adapter 0 .*ref-0.* failed on Ray at auto: "
                                            r".*no-such-folder does not exist"):
            ReferencePool(address="auto").train([job], quiet=True)  # "auto": the Ray this process runs
        assert ray.is_initialized()  # not the pool's: left running
    finally:
        ray.shutdown()
    assert not (tmp_path / "ref-0" / "adapter").exists()


def test_bad_ray_address_is_one_line_before_any_work(tmp_path):
    run = str(tmp_path / "not-a-run")  # never read: the address is checked first
    assert_one_line_error(invoke_cli("audit", run, "--references", "2", "--ray-address", "127.0.0.1:1"),
                          "cannot reach Ray", "127.0.0.1:1")
    assert_one_line_error(invoke_cli("audit", run, "--references", "2", "--ray-address", "headnode"),
                          "HOST:PORT", "headnode")
    assert_one_line_error(invoke_cli("audit", run, "--references", "2", "--reference-workers", "0"), "≥ 1")
    assert_one_line_error(invoke_cli("audit", run, "--reference-workers", "2"), "--references")


def test_sequential_unless_asked():
    assert not ReferencePool().uses_ray(8)
    assert not ReferencePool(workers=4).uses_ray(1)  # one reference left to train: no Ray start for it
    assert ReferencePool(workers=2).uses_ray(3) and ReferencePool(workers=2).concurrency(3) == 2
    assert ReferencePool(address="auto").uses_ray(1) and ReferencePool(address="auto").concurrency(5) == 5
