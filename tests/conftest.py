"""Shared fixtures: tiny, seeded model configurations that run on a CPU in milliseconds."""

import os
import shutil
import tempfile

import pytest

# The host side and the engine never reach a model hub; make any accidental attempt fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One compute thread per process, in this process and the engines and workers the tests start (they inherit it):
# the tiny models gain nothing from more, and a thread pool per process oversubscribes a machine that runs several
# (a tiny-pipeline test took 0.23 s with one thread, 28.5 s with the default in a contended run). Set before
# anything imports torch, which reads it once.
TEST_THREADS = "1"
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, TEST_THREADS)


def pytest_configure(config: pytest.Config) -> None:
    """Pin torch's threads here too, should a plugin have imported torch before this file ran."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_in_pytests_folder(tmp_path_factory: pytest.TempPathFactory):
    """What the code under test writes to the temp folder (an unsaved Nuke script's result cache, a self-test's
    scratch media, a subprocess's files) goes under pytest's own base folder, which pytest prunes (it keeps the
    newest three runs), instead of being left in /tmp by every run of the suite."""
    folder = tmp_path_factory.mktemp("tmp")
    # Ray puts AF_UNIX sockets under its temp folder, whose paths may not exceed 107 bytes: under pytest's folder
    # (itself under .ci/test's scratch folder) they do. Ray gets a short folder of its own, removed at the end.
    ray_folder = tempfile.mkdtemp(prefix="vr", dir="/tmp")
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(folder))
    patch.setenv("RAY_TMPDIR", ray_folder)
    patch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    patch.undo()
    shutil.rmtree(ray_folder, ignore_errors=True)


TINY_WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


@pytest.fixture
def passthrough_engine(tmp_path):
    """A real engine, in process on a free loopback port, with the model-free PassThroughRunner: its address."""
    from vera_engine.service import Engine, create_server
    from vera_engine.service.testing import PassThroughRunner

    engine = Engine(tmp_path / "spool", PassThroughRunner())
    server, port = create_server(engine, "127.0.0.1", 0)
    engine.start()
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()
    engine.stop()


@pytest.fixture
def make_harness(tmp_path):
    """Make in-process engines (`tests.service_helpers.Harness`: engine, loopback server, client); stopped after."""
    from tests.service_helpers import Harness
    from vera_engine.service.testing import PassThroughRunner

    made = []

    def make(runner=None, spool=None, **kw):
        h = Harness(spool or tmp_path / "spool", runner or PassThroughRunner(), **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


@pytest.fixture
def tiny_wan():
    """A seeded random `WanTransformer3DModel` of a tiny Wan2.1 T2V shape."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY_WAN_CONFIG).eval()


def make_tiny_wan_pipeline_parts(seed: int = 0) -> dict:
    """Components of a tiny diffusers-format Wan2.1 T2V pipeline: Wan transformer, Wan VAE, umT5, tokenizer."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from vera_engine.pipelines.pipeline_vera import make_scheduler

    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=1,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    transformer = WanTransformer3DModel(**{**TINY_WAN_CONFIG, "in_channels": 16, "out_channels": 16}).eval()
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=make_scheduler("unipc"),
    )
