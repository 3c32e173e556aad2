"""Tiny random-weight models of every supported architecture, built from configs (no download)."""
import warnings

import torch
import transformers

VOCAB = 211  # not a multiple of any tile size
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=3, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "phi3": ("Phi3Config", {}),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16)),
    "olmo2": ("Olmo2Config", {}),
}


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, **overrides):
    """An eval-mode model whose weights are large enough that next-token choices are not near-ties
    (random init at the usual 0.02 makes every logit almost equal); ``overrides`` go to its
    config."""
    config_class, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})
    config.initializer_range = 0.1
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


CHAT_TEMPLATE = ("{% for m in messages %}"
                 "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_SPECIALS = ["<|im_end|>", "<|im_start|>", "<pad>"]  # ids 0, 1, 2


def chat_tokenizer():
    """A character-level tokenizer of printable ASCII with a ChatML chat template (the one
    SmolLM2-Instruct uses), built without any hub; its ids fit ``tiny_chat_model``."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(CHAT_SPECIALS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(CHAT_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_chat_model(seed: int = 0, **overrides):
    """A tiny Llama whose vocabulary is :func:`chat_tokenizer`'s (``<|im_end|>`` ends a turn)."""
    return tiny_model("llama", seed, vocab_size=len(CHAT_SPECIALS) + 100, eos_token_id=0,
                      bos_token_id=1, pad_token_id=2, **overrides)
