import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from medfm.cli import main
from medfm.data import SPLITS, load_split
from medfm.errors import InvalidArgumentError, StoreError
from medfm.extract import extract
from medfm.store.features import FeatureStore, find_stores, list_stores

from .conftest import SYNTHETIC_FLAGS

TINY = dict(backbone="test_resnet", weights="random", input_size=32)


@pytest.mark.parametrize("flag", sorted(SYNTHETIC_FLAGS))
def test_extract_every_task_type_into_a_verified_store(flag, synthetic_root, tmp_path):
    result = extract(dataset=flag, size=28, data_root=synthetic_root, workdir=tmp_path,
                     progress=False, **TINY)
    assert result.status == "built"
    store = FeatureStore(result.path)
    store.verify()
    for split in SPLITS:
        images, labels = load_split(flag, 28, split, synthetic_root)
        feats = store.features(split)
        assert feats.shape == (len(images), store.dim) and feats.dtype == np.float32
        assert np.isfinite(feats).all() and feats.std() > 0
        np.testing.assert_array_equal(store.labels(split), labels)
        np.testing.assert_array_equal(store.index(split), np.arange(len(images)))
    attrs = store.attrs
    assert attrs["dataset"] == flag and attrs["arch"] == "test_resnet"
    assert attrs["weights_source"] == "random" and len(attrs["weights_digest"]) >= 16
    assert store.request["weights"] == "random"
    assert store.request["backbone"] == "test_resnet.r160_in1k"  # canonical id
    assert '"input_size": 32' in attrs["preprocess_json"]
    assert attrs["data_md5"] and attrs["fingerprint"] == store.fingerprint


def test_features_are_the_backbone_prelogits_of_the_preprocessed_images(synthetic_root, tmp_path):
    import torch

    from medfm.backbones import create_backbone
    from medfm.preprocess import DevicePreprocessor, resolve_preprocess

    # on the CPU (fp32) whatever the host has: CUDA extraction runs in bf16 (see the gpu test)
    result = extract(dataset="bloodmnist", size=28, data_root=synthetic_root, workdir=tmp_path,
                     dtype="float32", device="cpu", progress=False, **TINY)
    bb = create_backbone("test_resnet", weights="random")
    prep = DevicePreprocessor(resolve_preprocess(bb.data_config, input_size=32), "cpu")
    images, _ = load_split("bloodmnist", 28, "test", synthetic_root)
    with torch.inference_mode():
        x = prep(torch.from_numpy(images[:5]))
        ref = bb.model.eval().forward_head(bb.model.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(FeatureStore(result.path).features("test")[:5], ref.numpy(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone, dim", [("test_mambaout", 256), ("lcnet_050", 1280)])
def test_stores_hold_the_prelogits_width_even_past_the_trunk(backbone, dim, synthetic_root,
                                                            tmp_path):
    """MambaOut and LCNet (like MobileNetV3) end in a hidden head layer wider than their trunk's
    num_features: the store is as wide as forward_head(..., pre_logits=True)."""
    result = extract(dataset="breastmnist", size=28, backbone=backbone, weights="random",
                     input_size=64, data_root=synthetic_root, workdir=tmp_path, progress=False)
    assert FeatureStore(result.path).dim == dim


def test_rerun_is_a_noop_that_loads_no_model(synthetic_root, tmp_path, monkeypatch):
    first = extract(dataset="breastmnist", size=28, data_root=synthetic_root, workdir=tmp_path,
                    progress=False, **TINY)
    mtime = first.path.stat().st_mtime_ns

    monkeypatch.setattr("medfm.extract.extractor.create_backbone", _no_model)
    again = extract(dataset="breastmnist", size=28, data_root=synthetic_root, workdir=tmp_path,
                    progress=False, **TINY)
    assert again.status == "exists" and again.path == first.path
    assert first.path.stat().st_mtime_ns == mtime


def test_alias_bare_and_tagged_names_are_one_store(synthetic_root, tmp_path, monkeypatch):
    """resnet18 is an alias of resnet18.a1_in1k, also timm's default tag for the bare name:
    one request, one store, built once whatever the spelling."""
    kw = dict(dataset="breastmnist", size=28, data_root=synthetic_root, workdir=tmp_path,
              progress=False, weights="random", input_size=32)
    first = extract(backbone="resnet18", **kw)
    monkeypatch.setattr("medfm.extract.extractor.create_backbone", _no_model)
    for spelling in ("resnet18.a1_in1k", " resnet18 "):
        again = extract(backbone=spelling, **kw)
        assert again.status == "exists" and again.path == first.path
    assert "resnet18.a1_in1k" in first.path.name
    assert [s.path for s in find_stores(tmp_path, backbone="resnet18.a1_in1k")] == [first.path]


def _no_model(*args, **kwargs):
    raise AssertionError("a finished store must not load the backbone")


def test_extract_without_dataset_builds_every_file_present_and_names_the_rest(
        synthetic_root, tmp_path, capsys):
    argv = ["extract", "--backbone", "test_resnet", "--weights", "random", "--input-size", "32",
            "--size", "28", "--data-root", str(synthetic_root), "--workdir", str(tmp_path),
            "--quiet"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    built = {s["dataset"] for s in list_stores(tmp_path)}
    assert built == set(SYNTHETIC_FLAGS)
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert len(skipped) == 12 - len(SYNTHETIC_FLAGS) and "pathmnist@28" in err
    assert out.count("built ->") == len(SYNTHETIC_FLAGS)
    assert main(argv) == 0  # and again: everything found, nothing built
    assert capsys.readouterr().out.count("already extracted") == len(SYNTHETIC_FLAGS)


def test_force_recomputes(synthetic_root, tmp_path):
    first = extract(dataset="breastmnist", size=28, data_root=synthetic_root, workdir=tmp_path,
                    progress=False, **TINY)
    again = extract(dataset="breastmnist", size=28, data_root=synthetic_root, workdir=tmp_path,
                    progress=False, force=True, **TINY)
    assert again.status == "built"
    assert FeatureStore(again.path).fingerprint == FeatureStore(first.path).fingerprint


def test_identity_separates_policy_dtype_and_input_size(synthetic_root, tmp_path):
    kw = dict(dataset="breastmnist", size=28, data_root=synthetic_root, workdir=tmp_path,
              progress=False, backbone="test_resnet", weights="random")
    paths = {
        extract(**kw, input_size=32).path,
        extract(**kw, input_size=32, resize_policy="pad").path,
        extract(**kw, input_size=32, dtype="float32").path,
        extract(**kw, input_size=40).path,
    }
    assert len(paths) == 4
    assert len(find_stores(tmp_path, dataset="breastmnist")) == 4
    assert len(find_stores(tmp_path, dataset="breastmnist", resize_policy="pad")) == 1


def _partial_rows(path):
    try:
        with h5py.File(path, "r", locking=False) as fh:
            return sum(int(fh[s].attrs["rows_done"]) for s in SPLITS)
    except (OSError, KeyError):
        return 0


def test_sigkill_then_rerun_resumes_and_equals_uninterrupted(tmp_path):
    """A real process SIGKILLed mid-extraction; the rerun continues from its last chunk."""
    from medfm.synthetic import write_synthetic_npz

    root = tmp_path / "data"
    write_synthetic_npz(root, "pneumoniamnist", 28, n=(256, 64, 64))
    args = dict(dataset="pneumoniamnist", size=28, backbone="tf_efficientnet_lite0",
                weights="random", input_size=96, batch_size=8, data_root=root, progress=False)
    cmd = [sys.executable, "-m", "medfm", "extract", "--dataset", "pneumoniamnist", "--size",
           "28", "--backbone", "tf_efficientnet_lite0", "--weights", "random", "--input-size",
           "96", "--batch-size", "8", "--data-root", str(root), "--workdir",
           str(tmp_path / "killed"), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stores = tmp_path / "killed" / "stores"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partials = list(stores.glob("*.h5.partial")) if stores.exists() else []
        if partials and _partial_rows(partials[0]) >= 64:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"extraction ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(stores.glob("*.h5.partial"))[0]
    done_before = _partial_rows(partial)
    assert 64 <= done_before < 384
    assert list_stores(tmp_path / "killed")[0]["status"] == "partial"

    resumed = extract(workdir=tmp_path / "killed", **args)
    assert resumed.status == "resumed"
    assert not partial.exists()
    whole = extract(workdir=tmp_path / "whole", **args)
    a, b = FeatureStore(resumed.path), FeatureStore(whole.path)
    for split in SPLITS:
        np.testing.assert_array_equal(a.features(split), b.features(split))
    assert a.fingerprint == b.fingerprint
    a.verify()


def test_truncated_store_is_a_clear_error_and_force_rebuilds(synthetic_root, tmp_path, capsys):
    result = extract(dataset="breastmnist", size=28, data_root=synthetic_root, workdir=tmp_path,
                     progress=False, **TINY)
    data = result.path.read_bytes()
    result.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="medfm extract") as err:
        FeatureStore(result.path)
    assert str(result.path) in str(err.value)
    assert [r["status"] for r in list_stores(tmp_path)] == ["corrupt"]
    argv = ["extract", "--dataset", "breastmnist", "--size", "28", "--backbone", "test_resnet",
            "--weights", "random", "--input-size", "32", "--data-root", str(synthetic_root),
            "--workdir", str(tmp_path), "--quiet"]
    assert main(argv) == 2
    err_text = capsys.readouterr().err
    assert len(err_text.strip().splitlines()) == 1 and "--force" in err_text
    assert main(argv + ["--force"]) == 0
    FeatureStore(result.path).verify()


def test_flipped_feature_bytes_fail_the_block_checksum(synthetic_root, tmp_path):
    """A new store's rows carry block checksums (issue 26): a changed feature is named by its
    block, with the command that rebuilds the store."""
    result = extract(dataset="breastmnist", size=28, data_root=synthetic_root, workdir=tmp_path,
                     progress=False, **TINY)
    with h5py.File(result.path, "r+") as fh:
        fh["test"]["features"][0, 0] += 1
    with pytest.raises(StoreError, match="test/features rows 0-.* fail their checksum.*--force"):
        FeatureStore(result.path).verify()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dataset", "breastmnst", "--size", "28", "--backbone", "test_resnet"], "breastmnist"),
        (["--dataset", "breastmnist", "--size", "32", "--backbone", "test_resnet"], "28, 64"),
        (["--dataset", "breastmnist", "--size", "28", "--backbone", "test_resnett"], "test_resnet"),
        (["--dataset", "dermamnist", "--size", "28", "--backbone", "test_resnet"], "MD5"),
        (["--dataset", "breastmnist", "--size", "28", "--backbone", "test_resnet",
          "--batch-size", "0"], "batch size"),
        (["--dataset", "breastmnist", "--size", "28", "--backbone", "test_resnet",
          "--weights", "/nonexistent/w.pth"], "w.pth"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, needle, synthetic_root, tmp_path, capsys):
    code = main(["extract", *argv, "--data-root", str(synthetic_root), "--workdir",
                 str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err


def test_stores_verb_lists_complete_stores(synthetic_root, tmp_path, capsys):
    extract(dataset="retinamnist", size=28, data_root=synthetic_root, workdir=tmp_path,
            progress=False, **TINY)
    assert main(["stores", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "retinamnist" in out and "complete" in out and "48/16/24" in out


@pytest.mark.slow
def test_real_breastmnist_with_pretrained_lite0(real_root, tmp_path):
    result = extract(dataset="breastmnist", size=28, backbone="tf_efficientnet_lite0.in1k",
                     input_size=64, data_root=real_root, workdir=tmp_path, progress=False)
    store = FeatureStore(result.path)
    assert store.attrs["weights_source"].startswith("offline:")
    assert store.request["weights"] == "pretrained"
    assert store.attrs["data_md5"] == store.attrs["data_md5_official"]
    assert store.rows == {"train": 546, "val": 78, "test": 156} and store.dim == 1280
    # ImageNet features separate malignant from benign far above chance with a plain probe
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    clf = LogisticRegression(max_iter=2000, C=0.1).fit(store.features("train"),
                                                       store.labels("train").ravel())
    auc = roc_auc_score(store.labels("test").ravel(),
                        clf.predict_proba(store.features("test"))[:, 1])
    assert auc > 0.75


@pytest.mark.gpu
def test_cuda_bf16_features_stay_close_to_cpu_fp32(synthetic_root, tmp_path):
    """On a GPU host: CUDA extraction (bf16 autocast) gives the CPU fp32 features within bf16's
    precision (issue 15: the suite compares fp32 only on the CPU)."""
    args = dict(dataset="bloodmnist", size=28, data_root=synthetic_root, dtype="float32",
                progress=False, **TINY)
    cpu = FeatureStore(extract(workdir=tmp_path / "cpu", device="cpu", **args).path)
    gpu = FeatureStore(extract(workdir=tmp_path / "gpu", device="cuda", **args).path)
    for split in SPLITS:
        a, b = cpu.features(split), gpu.features(split)
        assert np.abs(a - b).max() <= 5e-2 * max(1.0, float(np.abs(a).max()))



def test_precision_is_part_of_a_store_identity_only_where_it_is_not_float32(synthetic_root,
                                                                             tmp_path):
    """float32 stores keep the identity and name they had before precision was keyed (old work
    directories find them); bfloat16 (CUDA's default) is another store."""
    from medfm.resolve.store import resolve_store_request
    from medfm.resolve.keys import store_filename

    kw = dict(dataset="breastmnist", size=28, backbone="test_resnet", weights="random",
              data_root=synthetic_root)
    cpu = resolve_store_request(**kw, device="cpu")  # auto on a CPU: float32
    assert cpu.precision == "float32"
    assert set(cpu.identity()) == {  # the fields every store recorded before (test_migrate)
        "dataset", "size", "data_digest", "backbone", "weights", "resize_policy", "input_size",
        "mean", "std", "normalize", "feature_kind", "dtype"}
    assert cpu.filename() == store_filename(cpu.identity())
    bf16 = resolve_store_request(**kw, precision="bfloat16")
    assert bf16.identity() == {**cpu.identity(), "precision": "bfloat16"}
    assert bf16.filename() != cpu.filename()
    assert resolve_store_request(**kw, precision="float32").filename() == cpu.filename()
    with pytest.raises(InvalidArgumentError, match="^precision 'fp8' is not one of auto, "
                                                   "float32, bfloat16.$"):
        resolve_store_request(**kw, precision="fp8")


def test_a_float32_partial_is_never_resumed_in_bfloat16(synthetic_root, tmp_path, monkeypatch):
    """An extraction killed after its first chunk, rerun in bfloat16 (CPU autocast here, as a
    GPU run would by default): a store of its own, computed whole; the float32 partial waits for
    a float32 run, which resumes it."""
    from medfm.store.features import StoreWriter

    args = dict(dataset="bloodmnist", size=28, data_root=synthetic_root, workdir=tmp_path,
                device="cpu", dtype="float32", chunk_rows=16, progress=False, **TINY)
    write = StoreWriter.write

    def killed_after_one_chunk(self, split, start, features):
        write(self, split, start, features)
        raise KeyboardInterrupt  # as a kill would, once the first chunk is on disk

    monkeypatch.setattr(StoreWriter, "write", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract(**args, precision="float32")
    monkeypatch.setattr(StoreWriter, "write", write)
    partial, = (tmp_path / "stores").glob("*.h5.partial")

    bf16 = extract(**args, precision="bfloat16")
    assert bf16.status == "built" and partial.exists()  # not resumed: another store
    assert FeatureStore(bf16.path).request["precision"] == "bfloat16"
    fp32 = extract(**args, precision="float32")
    assert fp32.status == "resumed" and not partial.exists()
    whole = extract(**{**args, "workdir": tmp_path / "whole"}, precision="float32")
    a, b = FeatureStore(fp32.path), FeatureStore(bf16.path)
    for split in SPLITS:
        np.testing.assert_array_equal(a.features(split), FeatureStore(whole.path).features(split))
        gap = np.abs(a.features(split) - b.features(split)).max()
        assert 0 < gap <= 5e-2 * max(1.0, float(np.abs(a.features(split)).max()))  # bf16 ran


def test_cuda_extraction_benchmarks_cudnn_and_keeps_float32_exact():
    """The backend flags an extraction on CUDA runs under, put back after (they are process-wide
    switches, so this runs on any host)."""
    import torch

    from medfm.extract.extractor import compute_settings

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    with compute_settings(torch.device("cuda"), "float32"):
        assert cudnn.benchmark and not cudnn.allow_tf32 and not matmul.allow_tf32
    assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == before
    with compute_settings(torch.device("cuda"), "bfloat16"):
        assert cudnn.benchmark and cudnn.allow_tf32 == before[1]
    with compute_settings(torch.device("cpu"), "float32"):
        assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == before


def test_padded_last_batches_give_the_same_features(synthetic_root, tmp_path, monkeypatch):
    """On CUDA each split's partial last batch is padded to a full batch (so cuDNN tunes one
    shape, not one per split); the padding rows must change no real row's features and never
    reach the store. Run here on the CPU with the padding switched on for it."""
    from medfm.extract import extractor

    args = dict(dataset="bloodmnist", size=28, data_root=synthetic_root, dtype="float32",
                batch_size=7, device="cpu", progress=False, **TINY)
    plain = FeatureStore(extract(workdir=tmp_path / "plain", **args).path)
    assert any(len(plain.labels(split)) % 7 for split in SPLITS)  # partial batches exist
    monkeypatch.setattr(extractor, "PAD_DEVICES", ("cpu", "cuda"))
    padded = FeatureStore(extract(workdir=tmp_path / "padded", **args).path)
    for split in SPLITS:
        assert padded.features(split).shape == plain.features(split).shape
        np.testing.assert_allclose(padded.features(split), plain.features(split), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.gpu
def test_float32_on_cuda_gives_the_cpu_features(synthetic_root, tmp_path):
    """--precision float32 on CUDA computes in float32 (TF32 off), so it matches the CPU store
    as closely as two float32 devices can."""
    args = dict(dataset="bloodmnist", size=28, data_root=synthetic_root, dtype="float32",
                precision="float32", progress=False, **TINY)
    cpu = FeatureStore(extract(workdir=tmp_path / "cpu", device="cpu", **args).path)
    gpu = FeatureStore(extract(workdir=tmp_path / "gpu", device="cuda", **args).path)
    assert cpu.path.name == gpu.path.name  # one identity: float32 is float32 on either device
    for split in SPLITS:
        np.testing.assert_allclose(gpu.features(split), cpu.features(split), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.gpu
def test_chunks_reach_the_gpu_whole_and_in_order(synthetic_root):
    import torch

    from medfm.extract.extractor import _chunks

    images, _ = load_split("bloodmnist", 28, "train", synthetic_root)
    got = [(lo, chunk) for lo, chunk in _chunks(images, 5, 10, torch.device("cuda"))]
    assert [lo for lo, _ in got] == list(range(5, len(images), 10))
    assert all(chunk.is_cuda and chunk.dtype == torch.uint8 for _, chunk in got)
    np.testing.assert_array_equal(torch.cat([c for _, c in got]).cpu().numpy(), images[5:])


@pytest.mark.parametrize("flags, precision", [([], None), (["--precision", "bfloat16"],
                                                           "bfloat16")])
def test_extract_precision_follows_the_device_asked_for(flags, precision, synthetic_root,
                                                        tmp_path):
    """`--device cpu` means float32 by default even where a GPU is visible; --precision says
    otherwise, and the store records it."""
    code = main(["extract", "--dataset", "breastmnist", "--size", "28", "--backbone",
                 "test_resnet", "--weights", "random", "--input-size", "32", "--device", "cpu",
                 "--data-root", str(synthetic_root), "--workdir", str(tmp_path), "--quiet",
                 *flags])
    assert code == 0
    store, = find_stores(tmp_path)
    assert store.request.get("precision") == precision


def test_compiled_extraction_gives_the_eager_features_in_the_same_store(synthetic_root,
                                                                        tmp_path):
    """--compile (torch.compile, inductor: gcc on this CPU) is recorded with the store, not in
    its identity, and gives the eager features within the float16 store's tolerance."""
    args = dict(dataset="breastmnist", size=28, data_root=synthetic_root, device="cpu",
                batch_size=16, progress=False, **TINY)
    eager = FeatureStore(extract(workdir=tmp_path / "eager", **args).path)
    compiled = FeatureStore(extract(workdir=tmp_path / "compiled", compile=True, **args).path)
    assert compiled.path.name == eager.path.name
    assert eager.attrs["compiled"] == 0 and compiled.attrs["compiled"] == 1
    assert compiled.attrs["compile_warmup_s"] > 0
    for split in SPLITS:
        np.testing.assert_allclose(compiled.features(split), eager.features(split), rtol=2e-3,
                                   atol=2e-3)
    again = extract(workdir=tmp_path / "compiled", **args)  # eager asks: the store is done
    assert again.status == "exists"


def test_cpu_chunks_come_whole_and_in_order_through_the_reused_buffers(synthetic_root):
    """The loader reads into a ring of PREFETCH_CHUNKS + 2 reused host buffers; more chunks than
    buffers must still arrive whole, in order, none overwritten while in use."""
    from medfm.extract.extractor import PREFETCH_CHUNKS, _chunks

    import torch

    images, _ = load_split("bloodmnist", 28, "train", synthetic_root)
    got = [(lo, chunk.clone()) for lo, chunk in _chunks(images, 5, 7, torch.device("cpu"))]
    assert len(got) > PREFETCH_CHUNKS + 2
    assert [lo for lo, _ in got] == list(range(5, len(images), 7))
    np.testing.assert_array_equal(torch.cat([c for _, c in got]).numpy(), images[5:])


def test_the_writer_thread_writes_in_order_and_raises_its_errors_in_the_caller(tmp_path):
    """Chunks go to the HDF5 store from a background thread; a write error (here NaN features)
    is raised in the caller, and the rows written before it stay."""
    import torch

    from medfm.extract.extractor import _ChunkWriter
    from medfm.store.features import StoreWriter

    labels = {"train": np.zeros((30, 1), dtype=np.int64)}
    writer = StoreWriter(tmp_path / "s.h5", {"dtype": "float32"}, dim=4, labels=labels,
                         attrs={})
    feats = torch.arange(120, dtype=torch.float32).reshape(30, 4)
    with _ChunkWriter(writer, 10, 4, torch.device("cpu")) as out:
        for lo in (0, 10):
            out.submit("train", lo, feats[lo:lo + 10])
    assert writer.rows_done("train") == 20
    bad = feats[20:].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(StoreError, match="NaN"):
        with _ChunkWriter(writer, 10, 4, torch.device("cpu")) as out:
            out.submit("train", 20, bad)
    assert writer.rows_done("train") == 20
    writer.close()


def test_one_model_load_serves_several_datasets_and_sizes(synthetic_root, tmp_path,
                                                          monkeypatch):
    """Consecutive extractions with one backbone load it once (a grid worker's small stores),
    and give the features a fresh load gives."""
    from medfm.extract import extractor

    extractor.release_models()
    created = []

    def counted(*args, **kwargs):
        created.append(args)
        return create(*args, **kwargs)

    create = extractor.create_backbone
    monkeypatch.setattr(extractor, "create_backbone", counted)
    runs = [("breastmnist", 28), ("bloodmnist", 28), ("bloodmnist", 64)]
    kept = [FeatureStore(extract(dataset=d, size=s, data_root=synthetic_root,
                                 workdir=tmp_path / "kept", device="cpu", progress=False,
                                 **TINY).path) for d, s in runs]
    assert len(created) == 1
    extractor.release_models()
    fresh = FeatureStore(extract(dataset="bloodmnist", size=64, data_root=synthetic_root,
                                 workdir=tmp_path / "fresh", device="cpu", progress=False,
                                 **TINY).path)
    assert len(created) == 2
    for split in SPLITS:
        np.testing.assert_array_equal(kept[2].features(split), fresh.features(split))
