"""DeepSeek-V3's multi-token prediction layer in a Hugging Face checkpoint -> ``head.mtp`` and back.

HF's DeepseekV3ForCausalLM builds no MTP layer, so the checkpoint is made by hand as DeepSeek's are: a tiny random
4-layer DeepseekV3 model saved by transformers, its config set to 3 layers, so that layer 3 is the MTP layer's
decoder layer, and the MTP layer's own tensors (enorm, hnorm, eh_proj, shared_head.norm) and its copies of the
embedding and head added to the safetensors. The imported model's MTP logits are checked against DeepSeek's module
computed by hand from those tensors, with transformers' own decoder layer as its block.
"""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from safetensors.torch import load_file, save_file

import moec
from moec.interop import export_hf, import_hf
from moec.interop.weights import WeightsError
from tests.interop.test_hf_families import DSV3, randomised, rel

LAYERS = 3  # the model's; layer 3 of the checkpoint is the MTP layer's block


def write_checkpoint(directory, copy_scale: float = 1.0) -> tuple[torch.nn.Module, dict]:
    """A DeepSeek-V3 checkpoint with one MTP layer; returns the 4-layer HF model it was cut from and the MTP tensors.
    ``copy_scale`` != 1: the MTP layer's head copy differs from lm_head."""
    config = T.DeepseekV3Config(**DSV3 | {"num_hidden_layers": LAYERS + 1}, q_lora_rank=24, n_group=4, topk_group=2,
                                norm_topk_prob=True)
    config.architectures = ["DeepseekV3ForCausalLM"]
    hf4 = randomised(config)
    hf4.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    d, generator = config.hidden_size, torch.Generator().manual_seed(3)
    prefix = f"model.layers.{LAYERS}."
    own = {prefix + "enorm.weight": 1 + 0.1 * torch.randn(d, generator=generator),
           prefix + "hnorm.weight": 1 + 0.1 * torch.randn(d, generator=generator),
           prefix + "shared_head.norm.weight": 1 + 0.1 * torch.randn(d, generator=generator),
           prefix + "eh_proj.weight": 0.2 * torch.randn(d, 2 * d, generator=generator),
           prefix + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
           prefix + "shared_head.head.weight": tensors["lm_head.weight"] * copy_scale}
    save_file(tensors | own, directory / "model.safetensors", metadata={"format": "pt"})
    saved = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(saved | {"num_hidden_layers": LAYERS, "num_nextn_predict_layers": 1}))
    return hf4, own


def deepseek_mtp_logits(hf4, own: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(main logits, depth-1 MTP logits) as DeepSeek-V3 computes them: h = the last layer's output before the final
    norm, x = eh_proj([enorm(embed(token i+1)), hnorm(h)]), the MTP decoder layer, shared_head.norm, the head."""
    prefix, model = f"model.layers.{LAYERS}.", hf4.model
    seen = {}
    model.norm.register_forward_hook(lambda module, args, out: seen.update(h=args[0]))
    model.layers[0].register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs=kwargs), with_kwargs=True)
    model.config.num_hidden_layers = LAYERS  # HF's forward runs layers[:num_hidden_layers]: the main model
    main = hf4(ids, use_cache=False).logits

    def norm(weight, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + hf4.config.rms_norm_eps) * weight

    following = model.embed_tokens(F.pad(ids[:, 1:], (0, 1)))  # token i+1; id 0 past the end, as moec pads
    x = torch.cat([norm(own[prefix + "enorm.weight"], following), norm(own[prefix + "hnorm.weight"], seen["h"])], -1)
    x = x @ own[prefix + "eh_proj.weight"].T
    kwargs = {key: seen["kwargs"][key] for key in ("attention_mask", "position_ids", "position_embeddings")}
    x = model.layers[LAYERS](x, **kwargs)
    return main, norm(own[prefix + "shared_head.norm.weight"], x) @ own[prefix + "shared_head.head.weight"].T


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv3_mtp")
    hf4, own = write_checkpoint(root / "hf")
    result = import_hf(root / "hf", root / "spec.yaml")
    return root, hf4, own, result


def test_mtp_layer_imports_as_head_mtp_and_computes_deepseeks_module(imported):
    _, hf4, own, result = imported
    spec = moec.load_spec(result.spec)
    assert spec.model.head.mtp.depth == 1 and spec.model.head.mtp.weight == 0.3 and result.notes == []
    model = moec.build_model(spec, weights=result.weights).train()  # the MTP modules run in training
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids)
        main, mtp = deepseek_mtp_logits(hf4.eval(), own, ids)
    assert rel(out.output, main) < 1e-5 and rel(out.mtp_logits[0], mtp) < 1e-5, (rel(out.output, main), rel(out.mtp_logits[0], mtp))
    print(f"main logits {rel(out.output, main):.2g}, MTP logits {rel(out.mtp_logits[0], mtp):.2g} (relative to the largest)")


def test_export_writes_the_mtp_layer_back_bit_identical(imported):
    root, _, _, result = imported
    spec = moec.load_spec(result.spec)
    export_hf(spec, moec.build_model(spec, weights=result.weights).state_dict(), root / "back")
    source, back = load_file(root / "hf" / "model.safetensors"), load_file(root / "back" / "model.safetensors")
    assert sorted(back) == sorted(source)
    assert all(torch.equal(back[name], source[name]) for name in source)
    assert json.loads((root / "back" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    again = T.AutoModelForCausalLM.from_pretrained(root / "back")  # transformers still loads it (the MTP layer ignored)
    assert again.config.num_hidden_layers == LAYERS


def test_an_mtp_head_copy_unlike_lm_head_is_refused(tmp_path):
    write_checkpoint(tmp_path / "hf", copy_scale=2.0)
    with pytest.raises(WeightsError, match="shared_head.head.weight differs from the model's head.weight"):
        import_hf(tmp_path / "hf", tmp_path / "spec.yaml")
    assert not (tmp_path / "spec.yaml").exists()
