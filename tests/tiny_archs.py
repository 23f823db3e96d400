"""Tiny models of many transformers architectures, built in code (no downloads), for the architecture matrix.

Each :class:`Arch` builds a randomly initialised model (hidden size 32-48, 1-2 layers), names the layers an adapter
targets (chosen to mix shapes: square, wide, tall, fused qkv, GPT-2 ``Conv1D``) and makes a model input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], object]  # () → a PreTrainedModel in float32, eval mode
    targets: list[str]
    inputs: Callable[[object], dict]  # model → kwargs for its forward

    def model(self, dtype: torch.dtype = torch.float32, seed: int = 0):
        torch.manual_seed(seed)
        return self.build().to(dtype).eval()


def _ids(model, batch: int = 2, length: int = 7) -> dict:
    vocab = model.config.get_text_config().vocab_size
    return {"input_ids": torch.randint(0, min(vocab, 60), (batch, length), generator=torch.Generator().manual_seed(1))}


def _seq2seq(model) -> dict:
    ids = _ids(model)["input_ids"]
    return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}


def _whisper(model) -> dict:
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(1, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=gen).to(model.dtype)
    return {"input_features": feats, "decoder_input_ids": torch.tensor([[1, 2, 3]])}


def _causal(config_cls: str, model_cls: str, **kwargs) -> Callable[[], object]:
    def build():
        import transformers

        config = getattr(transformers, config_cls)(**kwargs)
        return getattr(transformers, model_cls)(config)

    return build


_SMALL = dict(vocab_size=64, max_position_embeddings=64)
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False, **_SMALL)
_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("llama", _causal("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE), _LLAMA_TARGETS, _ids),
    Arch("mistral", _causal("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE), _LLAMA_TARGETS, _ids),
    Arch("qwen2", _causal("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE), _LLAMA_TARGETS, _ids),
    Arch("qwen3", _causal("Qwen3Config", "Qwen3ForCausalLM", head_dim=8, **_LLAMA_LIKE), _LLAMA_TARGETS, _ids),
    Arch("gemma2", _causal("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, **_LLAMA_LIKE), _LLAMA_TARGETS, _ids),
    Arch("gemma3", _causal("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, **_LLAMA_LIKE), _LLAMA_TARGETS, _ids),
    Arch("phi3", _causal("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **_LLAMA_LIKE),
         ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], _ids),
    Arch("gpt2", _causal("GPT2Config", "GPT2LMHeadModel", n_embd=48, n_layer=2, n_head=4, vocab_size=64,
                         n_positions=64, tie_word_embeddings=False),
         ["c_attn", "c_proj", "c_fc", "lm_head"], _ids),
    Arch("gpt_neox", _causal("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=32, intermediate_size=48,
                             num_hidden_layers=1, num_attention_heads=4, tie_word_embeddings=False, **_SMALL),
         ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], _ids),
    Arch("falcon", _causal("FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=4, vocab_size=64, tie_word_embeddings=False),
         ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], _ids),
    Arch("opt", _causal("OPTConfig", "OPTForCausalLM", hidden_size=32, ffn_dim=48, num_hidden_layers=1,
                        num_attention_heads=4, word_embed_proj_dim=32, **_SMALL),
         ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], _ids),
    Arch("bloom", _causal("BloomConfig", "BloomForCausalLM", hidden_size=32, n_layer=1, n_head=4, vocab_size=64),
         ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], _ids),
    Arch("gpt_bigcode", _causal("GPTBigCodeConfig", "GPTBigCodeForCausalLM", n_embd=48, n_layer=1, n_head=4,
                                vocab_size=64, n_positions=64),
         ["c_attn", "c_proj", "c_fc"], _ids),  # names as GPT-2's, but nn.Linear: stored (out, in)
    Arch("t5", _causal("T5Config", "T5ForConditionalGeneration", d_model=32, d_ff=48, d_kv=8, num_layers=1,
                       num_heads=4, vocab_size=64, decoder_start_token_id=0),
         ["q", "k", "v", "o", "wi", "wo"], _seq2seq),
    Arch("bart", _causal("BartConfig", "BartForConditionalGeneration", d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                         decoder_ffn_dim=48, **_SMALL),
         ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], _seq2seq),
    Arch("bert", _causal("BertConfig", "BertModel", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=48, **_SMALL),
         ["query", "key", "value", "dense"], _ids),
    Arch("roberta", _causal("RobertaConfig", "RobertaModel", hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=4, intermediate_size=48, pad_token_id=1, **_SMALL),
         ["query", "key", "value", "dense"], _ids),
    Arch("whisper", _causal("WhisperConfig", "WhisperForConditionalGeneration", d_model=32, encoder_layers=1,
                            decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                            encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=8,
                            max_target_positions=16, vocab_size=64, decoder_start_token_id=1, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, suppress_tokens=[], begin_suppress_tokens=[]),
         ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], _whisper),
]}


def untied_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0):
    """GPT-2 with its own ``lm_head`` (a Linear beside the Conv1D layers): the per-layer orientation case."""
    return ARCHS["gpt2"].model(dtype, seed)


def bert2gpt2(dtype: torch.dtype = torch.float32, seed: int = 0):
    """An EncoderDecoderModel: a BERT encoder (Linear layers) and a GPT-2 decoder (Conv1D layers). Its config.json
    says model_type "encoder-decoder"; the parts' model types are nested in it."""
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel, GPT2Config

    torch.manual_seed(seed)
    encoder = BertConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=64, max_position_embeddings=64)
    decoder = GPT2Config(n_embd=48, n_layer=1, n_head=4, vocab_size=64, n_positions=64, add_cross_attention=True,
                         is_decoder=True)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    return EncoderDecoderModel(config).to(dtype).eval()
