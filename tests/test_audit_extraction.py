"""Extraction and latent probe on a real (tiny) run, checked against brute-force numpy computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CONFIGS, FAST, run_cli
from privlora.audit.extraction import (
    extract,
    generations,
    initial_noise,
    latent_probe,
    normalised_distance,
    tiled_l2,
)
from privlora.data.imageset import ImageSet
from privlora.errors import UserError

N, STEPS, SEED, PLANTED = 16, 5, 3, 5  # 16 generations, 5 DDIM steps; generation 5 gets planted
BATCH = 8  # batched UNet passes round differently at another batch size (~1e-6), so copies use this one


def _load(run: Path):
    """The run-loading lines of the audit runner (kept here so this test does not depend on its internals)."""
    from privlora.config import load_config
    from privlora.data.splits import Splits
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import read_spec
    from privlora.train.data import load_training_data

    config = load_config(run / "config.yaml", {"resume": False})
    splits = Splits.load(run)
    task = load_task(config.base, read_spec(run / "adapter"), seed=config.seed)
    task.load_adapter(run / "adapter")
    task.model.eval()
    data = load_training_data(config, task)
    return task, data.by_ids(splits.members), data.by_ids(splits.eval)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    out = tmp_path_factory.mktemp("extraction") / "run"
    proc = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "3",
                   "--batch-size", "4", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    return _load(out)


@pytest.fixture(scope="module")
def gens(loaded) -> torch.Tensor:
    task, _, _ = loaded
    return torch.cat([pixels for _, pixels in generations(task, N, seed=SEED, batch=BATCH, steps=STEPS)])


@pytest.fixture(scope="module")
def planted(loaded, gens) -> ImageSet:
    """The members plus an exact copy of one generation: a training image the model is known to emit."""
    _, members, _ = loaded
    return ImageSet(ids=[*members.ids, "planted"], pixels=torch.cat([members.pixels, gens[PLANTED:PLANTED + 1]]),
                    captions=[*members.captions, ""])


@pytest.fixture(scope="module")
def result(loaded, planted):
    task, _, _ = loaded
    return extract(task, planted, n=N, seed=SEED, batch=BATCH, sample_steps=STEPS, gallery=4)


def _numpy_tiled(a: torch.Tensor, b: torch.Tensor, tiles: int) -> np.ndarray:
    a, b = (a.double().numpy() + 1) / 2, (b.double().numpy() + 1) / 2
    rows, cols = np.array_split(np.arange(a.shape[2]), tiles), np.array_split(np.arange(a.shape[3]), tiles)
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = max(np.sqrt(np.mean((a[i][:, r][:, :, c] - b[j][:, r][:, :, c]) ** 2))
                            for r in rows for c in cols)
    return out


@pytest.mark.parametrize("shape,tiles", [((1, 32, 32), 4), ((3, 10, 13), 4), ((1, 8, 8), 1)])
def test_tiled_l2_matches_numpy(shape, tiles):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand((3, *shape), generator=gen) * 2 - 1
    b = torch.cat([torch.rand((4, *shape), generator=gen) * 2 - 1, a[:1]])
    d = tiled_l2(a, b, tiles=tiles)
    np.testing.assert_allclose(d.numpy(), _numpy_tiled(a, b, tiles), rtol=1e-5, atol=1e-7)
    assert d[0, 4].item() == 0.0  # exact copy: exactly 0, no |a|²+|b|²−2ab cancellation
    np.testing.assert_allclose(tiled_l2(b, a, tiles=tiles).numpy(), d.numpy().T, rtol=1e-6)


def test_normalised_distance_matches_definition():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.1, 1.0, (6, 9))
    d[2, 4] = 0.0
    nearest, index, ratio = normalised_distance(torch.tensor(d), alpha=0.5, neighbours=3)
    s = np.sort(d, axis=1)
    np.testing.assert_allclose(nearest.numpy(), s[:, 0])
    np.testing.assert_array_equal(index.numpy(), d.argmin(1))
    np.testing.assert_allclose(ratio.numpy(), s[:, 0] / (0.5 * s[:, :3].mean(1)))
    assert ratio[2].item() == 0.0
    _, _, everything = normalised_distance(torch.tensor(d), neighbours=50)  # fewer columns than neighbours
    np.testing.assert_allclose(everything.numpy(), s[:, 0] / (0.5 * s.mean(1)))


def test_generations_are_task_ddim_from_their_own_seeds(loaded, gens):
    """Generation i is ``DiffusionTask.ddim`` from x_T seeded by (seed, i), whatever batch it fell in (the one
    DDIM loop is checked against diffusers' own in test_ddim.py)."""
    task, _, _ = loaded
    x = task.ddim(initial_noise(tuple(task.sample_shape()), SEED, 3, 2), STEPS)
    torch.testing.assert_close(task.to_pixels(x).float().cpu(), gens[3:5], rtol=0, atol=1e-5)


def test_planted_copy_is_extracted_and_no_face_is(loaded, gens, planted, result):
    assert result.tiled_l2[PLANTED] == 0.0 and result.normalised[PLANTED] == 0.0
    assert result.training_ids[result.nearest[PLANTED]] == "planted"
    # every flagged generation copies the planted image, never a face; generations of this barely trained
    # model look alike, so a few besides the planted one are also far closer to it than to any face
    flagged = result.extracted
    assert flagged[PLANTED] and {result.training_ids[i] for i in result.nearest[flagged]} == {"planted"}
    summary = json.loads(json.dumps(result.to_json()))
    assert summary["generated"] == N and summary["extracted"] == int(flagged.sum())
    assert summary["extracted_fraction"] == pytest.approx(flagged.mean())
    assert summary["unique_extracted"] == 1 and summary["largest_cluster"] == int(flagged.sum())
    assert summary["extracted_training_ids"] == [{"id": "planted", "generations": int(flagged.sum()),
                                                  "best_normalised": 0.0, "best_tiled_l2": 0.0}]
    assert summary["threshold"] == 1.0
    assert summary["parameters"]["neighbours_used"] == len(planted) == 33
    for q in summary["quantiles"].values():
        assert list(q.values()) == sorted(q.values())
    assert sum(c["generations"] for c in summary["nearest_concentration"]) <= N
    # without the planted copy the same generations copy no training image (random faces are not copies)
    task, members, _ = loaded
    clean = extract(task, members, n=N, seed=SEED, batch=N, sample_steps=STEPS, gallery=0)
    assert clean.extracted.sum() == 0 and clean.to_json()["extracted_training_ids"] == []
    np.testing.assert_allclose(clean.tiled_l2, _numpy_tiled(gens, members.pixels, 4).min(1), rtol=1e-4)


def test_results_do_not_depend_on_batch_size(loaded, planted, result):
    task, _, _ = loaded
    other = extract(task, planted, n=N, seed=SEED, batch=32, sample_steps=STEPS, gallery=4)
    np.testing.assert_array_equal(other.nearest, result.nearest)
    np.testing.assert_allclose(other.tiled_l2, result.tiled_l2, atol=1e-5)  # float rounding of batched passes
    np.testing.assert_allclose(other.normalised, result.normalised, atol=1e-5)
    np.testing.assert_array_equal(other.extracted, result.extracted)
    assert [p.generation for p in other.gallery] == [p.generation for p in result.gallery]


def test_gallery_is_the_best_pair_per_training_image(result, gens, planted):
    best: dict[int, tuple[float, float, int]] = {}
    for i in range(N):  # brute force over the stored per-generation scalars
        key = (result.normalised[i], result.tiled_l2[i], i)
        best[result.nearest[i]] = min(best.get(result.nearest[i], key), key)
    expected = sorted(best.values())[:4]
    assert [(p.normalised, p.tiled_l2, p.generation) for p in result.gallery] == expected
    first = result.gallery[0]
    assert first.generation == PLANTED and first.training_id == "planted"
    torch.testing.assert_close(first.generated, gens[PLANTED])
    for p in result.gallery:
        torch.testing.assert_close(p.generated, gens[p.generation])
        torch.testing.assert_close(p.training, planted.pixels[planted.ids.index(p.training_id)])


def test_gallery_png(result, tmp_path):
    path = result.gallery_png(tmp_path / "sub" / "gallery.png", scale=2)
    image = Image.open(path)
    assert image.size == (2 * 32 * 2, 4 * 32 * 2) and image.mode == "L"
    arr = np.asarray(image)
    np.testing.assert_array_equal(arr[:64, :64], arr[:64, 64:])  # row 0: the planted copy beside itself
    assert not np.array_equal(arr[64:128, :64], arr[64:128, 64:])
    assert not list(tmp_path.glob("sub/.*"))  # no temporary file left


def test_base_model_control_differs(loaded):
    task, members, _ = loaded
    adapter = extract(task, members, n=4, seed=SEED, batch=4, sample_steps=2, gallery=0)
    with task.adapter_disabled():
        base = extract(task, members, n=4, seed=SEED, batch=4, sample_steps=2, gallery=0)
    assert not np.allclose(adapter.tiled_l2, base.tiled_l2, rtol=0, atol=1e-7)
    again = extract(task, members, n=4, seed=SEED, batch=4, sample_steps=2, gallery=0)
    np.testing.assert_array_equal(again.tiled_l2, adapter.tiled_l2)  # the adapter is back on


def test_latent_probe_against_brute_force(loaded, planted, gens):
    task, _, held = loaded
    out = json.loads(json.dumps(latent_probe(task, planted, n=N, seed=SEED, control=held, batch=8,
                                             sample_steps=STEPS)))
    d_s, d_c = _numpy_tiled(gens, planted.pixels, 4), _numpy_tiled(gens, held.pixels, 4)
    closest_s, closest_c = d_s.min(0), d_c.min(0)
    assert [r["id"] for r in out["sensitive"]] == planted.ids
    np.testing.assert_allclose([r["closest_tiled_l2"] for r in out["sensitive"]], closest_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r["closest_tiled_l2"] for r in out["control"]], closest_c, rtol=1e-5, atol=1e-6)
    assert [r["closest_generation"] for r in out["sensitive"]] == d_s.argmin(0).tolist()
    planted_row = out["sensitive"][-1]
    assert planted_row["closest_tiled_l2"] == 0.0 and planted_row["closest_generation"] == PLANTED
    assert planted_row["score"] == max(r["score"] for r in out["sensitive"])
    pairs = closest_s[:, None] < closest_c[None, :]
    ties = closest_s[:, None] == closest_c[None, :]
    assert out["summary"]["auc"] == pytest.approx((pairs + 0.5 * ties).mean())
    assert out["summary"]["fraction_closer_than_any_control"] == pytest.approx((closest_s < closest_c.min()).mean())
    alone = latent_probe(task, planted, n=2, seed=SEED, sample_steps=1)
    assert "control" not in alone and "auc" not in alone["summary"]


def test_bad_input(loaded, planted):
    task, members, _ = loaded
    with pytest.raises(UserError, match="n must be at least 1, got 0"):
        extract(task, members, n=0, seed=0)
    small = ImageSet(ids=members.ids, pixels=F.interpolate(members.pixels, size=16), captions=members.captions)
    with pytest.raises(UserError, match=r"\(1, 16, 16\).*\(1, 32, 32\)"):
        extract(task, small, n=4, seed=0)
    with pytest.raises(UserError, match=r"\(1, 16, 16\).*\(1, 32, 32\)"):
        latent_probe(task, small, n=4, seed=0)
    with pytest.raises(UserError, match="control images"):
        latent_probe(task, members, n=4, seed=0, control=small)
    with pytest.raises(UserError, match="empty"):
        extract(task, members.subset([]), n=4, seed=0)
    for bad, needle in (({"batch": 0}, "batch"), ({"sample_steps": 0}, "sample_steps"), ({"gallery": -1}, "gallery"),
                        ({"threshold": 0.0}, "threshold"), ({"alpha": -1.0}, "alpha"), ({"tiles": 33}, "tiles"),
                        ({"neighbours": 0}, "neighbours")):
        with pytest.raises(UserError, match=needle):
            extract(task, members, n=4, seed=0, **bad)
    empty = extract(task, members, n=1, seed=0, sample_steps=1, gallery=0)
    with pytest.raises(UserError, match="gallery is empty"):
        empty.gallery_png(Path("unused.png"))


def test_extraction_streams_generations(loaded, planted, monkeypatch):
    """Memory must not grow with n: once the next batch is drawn, no earlier batch of pixels is alive."""
    import gc
    import weakref

    from privlora.audit import extraction

    task, _, _ = loaded
    alive: list[weakref.ref] = []
    most_alive = 0
    real = extraction.generations

    def tracked(*args, **kwargs):
        nonlocal most_alive
        for start, pixels in real(*args, **kwargs):
            gc.collect()
            most_alive = max(most_alive, sum(r() is not None for r in alive))
            alive.append(weakref.ref(pixels))
            yield start, pixels

    monkeypatch.setattr(extraction, "generations", tracked)
    extract(task, planted, n=6 * BATCH, seed=SEED, batch=BATCH, sample_steps=2, gallery=2)
    assert len(alive) == 6
    assert most_alive <= 1  # at most the batch just handed over (the gallery keeps clones, not batches)
