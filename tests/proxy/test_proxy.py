import pytest
import torch

from keel.proxy import ProxyBatches, ProxyConfig, create_proxy_model, list_proxy_sizes, load_corpus
from keel.proxy.trainer import TrainConfig, lr_lambda


def test_corpus_is_deterministic_stdlib_source():
    data = load_corpus()
    assert len(data) == 4_000_000 and data.dtype.name == "uint8"
    assert b"def " in data[:200_000].tobytes()


def test_batches_are_reproducible_and_splits_disjoint():
    a, b = ProxyBatches(batch_size=4, seq_len=16, seed=3), ProxyBatches(batch_size=4, seq_len=16, seed=3)
    xa, ya = a.next()
    xb, yb = b.next()
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and a.position == 1
    assert torch.equal(xa[:, 1:], ya[:, :-1])
    val = ProxyBatches(batch_size=4, seq_len=16, split="val")
    assert len(val.data) + len(a.data) == 4_000_000 and len(val.data) > 300_000


@pytest.mark.parametrize("size", list_proxy_sizes())
def test_every_size_builds_and_runs(size):
    model = create_proxy_model(size, seq_len=16)
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 256)


def test_sizes_grow():
    with torch.device("meta"):  # shapes only: the gpt2 size's 85M parameters need not be allocated
        counts = [create_proxy_model(s).num_params() for s in list_proxy_sizes()]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def test_bad_config_values():
    with pytest.raises(ValueError, match="d_model=100 is not divisible by n_heads=3"):
        ProxyConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown proxy size 'huge'; allowed: tiny"):
        create_proxy_model("huge")
    with pytest.raises(ValueError, match="TrainConfig.lr=0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="split='test'"):
        ProxyBatches(batch_size=1, seq_len=4, split="test")


def test_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1) and f(55) == pytest.approx(0.55)
