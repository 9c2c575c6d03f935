"""Tiny models for the module / patch / adapter tests, built offline from configs with random weights.

Each `Case` builds a model, makes inputs for it and names the layers patch() must pick (by default and
with vision=True). InternLM2, InternViT and an InternVL-style model (vision_model + mlp1 +
language_model) are small modules here with those projects' module names.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

R = 4  # adapter rank in the model tests
LLAMA_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128)
VOCAB = 128
IMAGE_TOKEN = 127


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """PyTorch path of the op by default (tests that want Triton take the `backend` fixture)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")


def layer_names(prefix: str, n_layers: int, suffixes) -> set[str]:
    return {f"{prefix}.{i}.{s}" for i in range(n_layers) for s in suffixes}


# ------------------------------------------------------------------------------------------------
# InternLM2 / InternViT / InternVL-style modules (their projects' module names)
# ------------------------------------------------------------------------------------------------
class _RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _InternLM2Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(B, T, D))


class _InternLM2FFN(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _InternLM2Layer(nn.Module):
    def __init__(self, d, hidden, heads):
        super().__init__()
        self.attention_norm = _RMSNorm(d)
        self.attention = _InternLM2Attention(d, heads)
        self.ffn_norm = _RMSNorm(d)
        self.feed_forward = _InternLM2FFN(d, hidden)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class _InternLM2Model(nn.Module):
    def __init__(self, d, hidden, heads, n_layers, vocab):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_InternLM2Layer(d, hidden, heads) for _ in range(n_layers))
        self.norm = _RMSNorm(d)


class TinyInternLM2(nn.Module):
    """InternLM2ForCausalLM's layout: model.layers.N.attention.{wqkv, wo}, feed_forward.{w1, w2, w3}, output."""

    def __init__(self, d=64, hidden=128, heads=4, n_layers=2, vocab=VOCAB):
        super().__init__()
        self.model = _InternLM2Model(d, hidden, heads, n_layers, vocab)
        self.output = nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self):
        return self.output

    def forward(self, input_ids=None, inputs_embeds=None):
        h = self.model.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.model.layers:
            h = layer(h)
        return self.output(self.model.norm(h))


class _InternViTAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=True)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, T, D))


class _InternViTMLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _InternViTLayer(nn.Module):
    def __init__(self, d, hidden, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = _InternViTAttention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = _InternViTMLP(d, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _InternViTEmbeddings(nn.Module):
    def __init__(self, d, patch):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=patch, stride=patch)

    def forward(self, pixel_values):
        return self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)


class _InternViTEncoder(nn.Module):
    def __init__(self, d, hidden, heads, n_layers):
        super().__init__()
        self.layers = nn.ModuleList(_InternViTLayer(d, hidden, heads) for _ in range(n_layers))


class TinyInternViT(nn.Module):
    """InternVisionModel's layout: encoder.layers.N.attn.{qkv, proj}, mlp.{fc1, fc2}."""

    def __init__(self, d=32, hidden=64, heads=2, n_layers=2, patch=8):
        super().__init__()
        self.embeddings = _InternViTEmbeddings(d, patch)
        self.encoder = _InternViTEncoder(d, hidden, heads, n_layers)

    def forward(self, pixel_values):
        h = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            h = layer(h)
        return h


class TinyInternVLChat(nn.Module):
    """InternVLChatModel's layout: vision_model (InternViT), mlp1 (projector), language_model (InternLM2)."""

    def __init__(self):
        super().__init__()
        self.vision_model = TinyInternViT()
        self.mlp1 = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
        self.language_model = TinyInternLM2()

    def get_output_embeddings(self):
        return self.language_model.output

    def forward(self, pixel_values, input_ids):
        img = self.mlp1(self.vision_model(pixel_values))
        txt = self.language_model.model.tok_embeddings(input_ids)
        return self.language_model(inputs_embeds=torch.cat([img, txt], dim=1))


# ------------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict]
    expected: set[str]  # patched by default
    expected_vision: set[str] | None = None  # patched with vision=True (None: same as default)

    def output(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        out = model(**inputs)
        if isinstance(out, torch.Tensor):
            return out
        for key in ("logits", "last_hidden_state"):
            if getattr(out, key, None) is not None:
                return getattr(out, key)
        raise TypeError(f"no output tensor in {type(out).__name__}")


def _ids(g, batch=2, T=10):
    return torch.randint(0, IMAGE_TOKEN, (batch, T), generator=g)


def _causal(cls_name, cfg_name, **extra):
    def build():
        import transformers

        cfg = getattr(transformers, cfg_name)(**TEXT, **extra)
        return getattr(transformers, cls_name)(cfg)
    return build


def _llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=16, patch_size=8),
        text_config=dict(model_type="llama", **TEXT), image_token_index=IMAGE_TOKEN, vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg)


def _internvl_hf():
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="qwen2", **TEXT), image_token_id=IMAGE_TOKEN, image_seq_length=4)
    return InternVLForConditionalGeneration(cfg)


def _image_inputs(size):
    def make(g):
        ids = _ids(g)
        ids[:, 1:5] = IMAGE_TOKEN  # 4 image tokens per sequence: 4 patches (after the model's own pooling)
        return dict(input_ids=ids, pixel_values=torch.randn(2, 3, size, size, generator=g))
    return make


def _clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=16, patch_size=8))


def _siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, image_size=16, patch_size=8))


CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
INTERNVL_HF_VISION = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.projection_layer",
                      "mlp.fc1", "mlp.fc2")
INTERNLM2_LAYER = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
INTERNVIT_LAYER = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
PHI3_LAYER = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

CASES = {c.name: c for c in [
    Case("llama", _causal("LlamaForCausalLM", "LlamaConfig"), lambda g: dict(input_ids=_ids(g)),
         layer_names("model.layers", 2, LLAMA_LAYER)),
    Case("qwen2", _causal("Qwen2ForCausalLM", "Qwen2Config"), lambda g: dict(input_ids=_ids(g)),
         layer_names("model.layers", 2, LLAMA_LAYER)),
    Case("mistral", _causal("MistralForCausalLM", "MistralConfig"), lambda g: dict(input_ids=_ids(g)),
         layer_names("model.layers", 2, LLAMA_LAYER)),
    Case("phi3", _causal("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, bos_token_id=1,
                                                    eos_token_id=2), lambda g: dict(input_ids=_ids(g)),
         layer_names("model.layers", 2, PHI3_LAYER)),
    Case("llava", _llava, _image_inputs(16),
         layer_names("model.language_model.layers", 2, LLAMA_LAYER),
         layer_names("model.language_model.layers", 2, LLAMA_LAYER)
         | layer_names("model.vision_tower.encoder.layers", 2, CLIP_LAYER)),
    Case("internvl_hf", _internvl_hf, _image_inputs(32),
         layer_names("model.language_model.layers", 2, LLAMA_LAYER),
         layer_names("model.language_model.layers", 2, LLAMA_LAYER)
         | layer_names("model.vision_tower.encoder.layer", 2, INTERNVL_HF_VISION)),
    Case("clip_vision", _clip, lambda g: dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g)),
         layer_names("encoder.layers", 2, CLIP_LAYER)),
    # SigLIP's attention-pooling head has an MLP too (head.mlp.fc1 / fc2): same suffixes, patched as well
    Case("siglip_vision", _siglip, lambda g: dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g)),
         layer_names("encoder.layers", 2, CLIP_LAYER) | {"head.mlp.fc1", "head.mlp.fc2"}),
    Case("internlm2", TinyInternLM2, lambda g: dict(input_ids=_ids(g)),
         layer_names("model.layers", 2, INTERNLM2_LAYER)),
    Case("internvit", TinyInternViT, lambda g: dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g)),
         layer_names("encoder.layers", 2, INTERNVIT_LAYER)),
    Case("internvl_chat", TinyInternVLChat,
         lambda g: dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g), input_ids=_ids(g)),
         layer_names("language_model.model.layers", 2, INTERNLM2_LAYER),
         layer_names("language_model.model.layers", 2, INTERNLM2_LAYER)
         | layer_names("vision_model.encoder.layers", 2, INTERNVIT_LAYER)),
]}


def build(case: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[case].build().eval()


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Give every adapter non-zero B (a fresh one is zero) so that outputs and gradients depend on it."""
    from lora_kernels import LoRALinear

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in sorted(model.named_modules(), key=lambda nm: nm[0]):
            if isinstance(m, LoRALinear):
                for d in (m.lora_A, m.lora_B):
                    for p in d.values():
                        p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_twin(base: nn.Module, patched: nn.Module, names, adapter: str = "default", alpha=2 * R, dropout=0.0):
    """PEFT LoRA on a copy of `base` targeting exactly `names`, with the patched model's adapter weights."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=alpha, lora_dropout=dropout,
                                                           target_modules=sorted(names)), adapter_name=adapter)
    root = model.base_model.model
    with torch.no_grad():
        for n in names:
            ours, theirs = patched.get_submodule(n), root.get_submodule(n)
            theirs.lora_A[adapter].weight.copy_(ours.lora_A[adapter])
            theirs.lora_B[adapter].weight.copy_(ours.lora_B[adapter])
    return model


def loss_of(out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A loss that weights every output element differently (a plain sum hides some errors)."""
    w = torch.randn(out.shape, generator=g, dtype=torch.float32)
    return (out.float() * w).sum()
