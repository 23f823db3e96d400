"""Tiny Llama and GPT-2 models built in code (no downloads), and helpers to make PEFT adapters on them."""

from __future__ import annotations

import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 64, intermediate: int = 96,
               layers: int = 2, vocab: int = 128):
    """A LlamaForCausalLM with random weights: q/o (h, h), k/v (h/2, h), gate/up (i, h), down (h, i)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A GPT2LMHeadModel whose c_attn / c_fc / c_proj are Conv1D (weights stored (in, out))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
    model = GPT2LMHeadModel(config).to(dtype)
    model.eval()
    return model


def peft_randlora(model, *, r: int = 8, seed: int = 0, sparse: bool = False, very_sparse: bool = False,
                  targets=None, alpha: float = 16.0, save_projection: bool = False, fan_in_fan_out: bool = False,
                  scale_seed: int = 1):
    """Wrap ``model`` in a PEFT RandLoRA adapter and give λ, γ random non-zero values (so ΔW ≠ 0)."""
    from peft import RandLoraConfig, get_peft_model

    config = RandLoraConfig(r=r, randlora_alpha=alpha, projection_prng_key=seed, sparse=sparse,
                            very_sparse=very_sparse, target_modules=targets or LLAMA_TARGETS,
                            save_projection=save_projection, fan_in_fan_out=fan_in_fan_out)
    return _randomize(get_peft_model(model, config), ("randlora_lambda", "randlora_gamma"), scale_seed)


def peft_vera(model, *, r: int = 8, seed: int = 0, save_projection: bool = True, targets=None, scale_seed: int = 3,
              **config):
    """Wrap ``model`` in a PEFT VeRA adapter and give λ_b, λ_d random non-zero values (PEFT inits λ_b = 0: ΔW = 0)."""
    from peft import VeraConfig, get_peft_model

    config = VeraConfig(r=r, projection_prng_key=seed, save_projection=save_projection,
                        target_modules=targets or LLAMA_TARGETS, **config)
    return randomize_trainable(get_peft_model(model, config), scale_seed)


def peft_lora(model, *, r: int = 4, alpha: float = 8.0, use_rslora: bool = False, targets=None,
              fan_in_fan_out: bool = False, rank_pattern=None, alpha_pattern=None, scale_seed: int = 2):
    """Wrap ``model`` in a PEFT LoRA adapter with random A and B (so ΔW ≠ 0)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=targets or LLAMA_TARGETS,
                        fan_in_fan_out=fan_in_fan_out, rank_pattern=rank_pattern or {},
                        alpha_pattern=alpha_pattern or {}, init_lora_weights=False)
    return _randomize(get_peft_model(model, config), ("lora_A", "lora_B"), scale_seed)


def _randomize(peft_model, names: tuple[str, ...], seed: int):
    """Fill the adapter parameters whose name contains one of ``names`` with N(0, 0.1²) draws, in parameter order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft_model


def peft_layer_deltas(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's own ``get_delta_weight`` per targeted module, keyed by the base checkpoint weight key, float32."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = module.get_delta_weight("default").detach().float()
    return out


def tiny_bert_classifier(seed: int = 0, dtype: torch.dtype = torch.float32, labels: int = 3):
    """A BertForSequenceClassification (every Linear has a bias; ``classifier`` is the head PEFT's SEQ_CLS saves)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                        vocab_size=64, max_position_embeddings=32, num_labels=labels)
    return BertForSequenceClassification(config).to(dtype).eval()


def tiny_llama_classifier(seed: int = 0, dtype: torch.dtype = torch.float32, labels: int = 3):
    """A LlamaForSequenceClassification (its ``score`` head has no bias)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, num_labels=labels,
                         pad_token_id=0)
    return LlamaForSequenceClassification(config).to(dtype).eval()


def randomize_trainable(peft_model, seed: int = 3):
    """Give every trainable parameter (adapter, modules_to_save copy, trained bias) N(0, 0.1²) values, as if trained."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype))
    return peft_model


def tiny_vit_classifier(seed: int = 0, dtype: torch.dtype = torch.float32, labels: int = 3):
    """A ViTForImageClassification: in memory ``vit.layers.N.attention.q_proj``, on disk (transformers ≥ 5)
    ``vit.encoder.layer.N.attention.attention.query``."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                       image_size=16, patch_size=8, num_labels=labels)
    return ViTForImageClassification(config).to(dtype).eval()


def tiny_mixtral(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A MixtralForCausalLM: experts fused in memory (``mlp.experts.gate_up_proj`` (E, 2I, h)), stored per expert on
    disk (``block_sparse_moe.experts.N.w1.weight``) by transformers ≥ 5."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=32, tie_word_embeddings=False)
    return MixtralForCausalLM(config).to(dtype).eval()


def tiny_siglip_vision(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A SiglipVisionModel: its pooling head ``head.attention`` is an ``nn.MultiheadAttention``."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                image_size=16, patch_size=8)
    return SiglipVisionModel(config).to(dtype).eval()


def tiny_qwen2_moe(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A Qwen2MoeForCausalLM: experts fused in memory (``mlp.experts.gate_up_proj`` (E, 2I, h)), stored per expert
    on disk (``mlp.experts.N.gate_proj/up_proj/down_proj.weight``), plus a Linear ``mlp.shared_expert``."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                            shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                            max_position_embeddings=32, tie_word_embeddings=False)
    return Qwen2MoeForCausalLM(config).to(dtype).eval()


def tiny_gpt_oss(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A GptOssForCausalLM: experts fused and transposed (``is_transposed``: ``mlp.experts.gate_up_proj`` (E, h, 2I)),
    stored fused on disk too."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False,
                          layer_types=["full_attention"], rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    return GptOssForCausalLM(config).to(dtype).eval()


def tiny_ergo(seed: int = 0, dtype: torch.dtype = torch.float32):
    """An ErgoForCausalLM whose shared expert is square (h = shared_intermediate = 32): transformers stores
    ``mlp.shared_experts.up_proj`` / ``down_proj`` transposed on disk (``feed_forward.shared_up_proj``, (in, out))."""
    from transformers import ErgoConfig, ErgoForCausalLM

    torch.manual_seed(seed)
    config = ErgoConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, first_dense_intermediate_size=48, num_dense_blocks=1,
                        moe_intermediate_size=16, shared_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    return ErgoForCausalLM(config).to(dtype).eval()


def tiny_hrm_text(seed: int = 0, dtype: torch.dtype = torch.float32):
    """An HrmTextForCausalLM: on disk ``mlp.gate_up_proj`` and ``attn.gqkv_proj`` are fused, in memory transformers
    chunks them into ``mlp.gate_proj`` / ``up_proj`` and ``self_attn.gate_proj`` / ``q_proj`` / ``k_proj`` /
    ``v_proj`` (all square, 32 × 32) and renames ``attn.o_proj`` to ``self_attn.o_proj``."""
    from transformers import HrmTextConfig, HrmTextForCausalLM

    torch.manual_seed(seed)
    config = HrmTextConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, head_dim=8)
    return HrmTextForCausalLM(config).to(dtype).eval()


def tiny_whisper(seed: int = 0, tied: bool = True):
    """A WhisperForConditionalGeneration (Conv1d ``conv1``/``conv2`` in the encoder); ``tied``: ``proj_out`` shares
    the decoder's ``embed_tokens`` (not stored in the checkpoint)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
                           max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1, tie_word_embeddings=tied)
    return WhisperForConditionalGeneration(config).eval()


def tiny_tied_llama(seed: int = 0):
    """A LlamaForCausalLM whose ``lm_head`` is tied to ``model.embed_tokens`` (stored once, as the embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()
