"""Build tiny random HF models (hidden 32, 2 layers) for 8 families; save_pretrained to /tmp/onnx-research/tiny/<family>."""
import sys, os, torch, transformers as T
OUT = "/tmp/onnx-research/tiny"
torch.manual_seed(0)
common = dict(vocab_size=128, max_position_embeddings=64)
dec = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
cfgs = {
  "llama":   (T.LlamaConfig(num_key_value_heads=2, **dec), T.LlamaForCausalLM),
  "mistral": (T.MistralConfig(num_key_value_heads=2, sliding_window=None, **dec), T.MistralForCausalLM),
  "qwen2":   (T.Qwen2Config(num_key_value_heads=2, **dec), T.Qwen2ForCausalLM),
  "phi3":    (T.Phi3Config(num_key_value_heads=2, **dec), T.Phi3ForCausalLM),
  "gpt_neox":(T.GPTNeoXConfig(**dec), T.GPTNeoXForCausalLM),
  "gpt2":    (T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                           bos_token_id=1, eos_token_id=2), T.GPT2LMHeadModel),
  "bert":    (T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_labels=2, pad_token_id=0, **common), T.BertForSequenceClassification),
  "roberta": (T.RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_labels=2, pad_token_id=1, vocab_size=128, max_position_embeddings=66),
              T.RobertaForSequenceClassification),
}
for name, (cfg, cls) in cfgs.items():
    m = cls(cfg).eval()
    d = os.path.join(OUT, name); m.save_pretrained(d)
    print(name, sum(p.numel() for p in m.parameters()), sorted(os.listdir(d)))
