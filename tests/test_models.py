"""Model specs: every spec loads and its parameter count matches the published total."""
import pytest

from wse.workload.models import ModelError, load_model, model_names

# relative tolerance per model: exact where the published figure is an exact count
TOLERANCE = {"deepseek-v3": 1e-4, "kimi-k2": 1e-2, "gpt-oss-120b": 1e-4}
REQUIRED = ["llama3.1-8b", "llama3.1-70b", "llama3.1-405b", "llama2-13b", "qwen2-72b", "mixtral-8x7b",
            "deepseek-v3", "kimi-k2", "gpt-oss-120b", "tiny"]


def test_the_zoo_has_the_required_models():
    assert set(REQUIRED) <= set(model_names())


@pytest.mark.parametrize("name", [n for n in REQUIRED if n != "tiny"])
def test_parameter_counts_match_published_totals(name):
    m = load_model(name)
    assert m.published_params
    rel = abs(m.total_params() - m.published_params) / m.published_params
    assert rel <= TOLERANCE.get(name, 1e-9), (m.total_params(), m.published_params)


def test_active_parameters_of_moe_models():
    # Mixtral: 12.9B active; DeepSeek-V3: 37B active; Kimi K2: 32B active; gpt-oss-120b: 5.13B
    # active plus its embedding table (0.58B), which the card excludes
    assert load_model("mixtral-8x7b").active_params() / 1e9 == pytest.approx(12.88, abs=0.02)
    assert load_model("deepseek-v3").active_params() / 1e9 == pytest.approx(37.5, abs=0.6)
    assert load_model("kimi-k2").active_params() / 1e9 == pytest.approx(32.9, abs=0.6)
    g = load_model("gpt-oss-120b")
    assert (g.active_params() - g.embedding_params()) / 1e9 == pytest.approx(5.13, abs=0.01)


def test_weight_bytes_follow_the_dtypes():
    assert load_model("llama3.1-8b").weight_bytes() == 2 * load_model("llama3.1-8b").total_params()
    assert load_model("deepseek-v3").weight_bytes() == load_model("deepseek-v3").total_params()
    g = load_model("gpt-oss-120b")
    assert g.weight_bytes() < 0.6 * 2 * g.total_params()  # MXFP4 experts


def test_decode_flops_are_two_per_active_weight_plus_attention():
    m = load_model("llama3.1-8b")
    f = m.decode_flops_per_token(1024)
    assert f == 2 * (m.total_params() - m.embedding_params()) + 4 * 32 * 128 * 1024 * 32


def test_unknown_and_malformed_models(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'llama9'"):
        load_model("llama9")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nhidden_size = [")
    with pytest.raises(ModelError, match="malformed TOML"):
        load_model(str(bad))
    bad.write_text("name = 'x'\nhidden_size = 64\nlayers = 1\nheads = 3\nkv_heads = 2\nhead_dim = 8\n"
                   "ffn_size = 8\nvocab_size = 8\n")
    with pytest.raises(ModelError, match="multiple of kv_heads"):
        load_model(str(bad))
    bad.write_text("name = 'x'\nhidden_size = 64\nbogus = 1\n")
    with pytest.raises(ModelError, match="unknown key bogus"):
        load_model(str(bad))
