"""Regenerate tests/data/hf_tiny_bert/: a tiny random BERT saved the way transformers saves one, and transformers'
own float32 outputs for a few fixed inputs (expected.npz), for tests/test_hf.py.

    python tests/make_hf_fixture.py        # needs torch and transformers (test-only extras, not in requirements)

The folder holds config.json, model.safetensors (encoder with pooler, MLM head, NSP head, 3-label classifier: the
tensors of BertForPreTraining plus BertForSequenceClassification's classifier, sharing one encoder), vocab.txt and
tokenizer_config.json. Like Google's vocabularies, [UNK] [CLS] [SEP] [MASK] are not at ids 1..4.
"""
import json
import os
import shutil

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf_tiny_bert")
WORDS = ("the quick brown fox jump over lazy dog cat sat on mat is it happy sad good bad and to in was "
         "hello world run walk big small red blue").split()
VOCAB = (["[PAD]"] + [f"[unused{i}]" for i in range(9)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
         + list(".,!?'-") + [chr(c) for c in range(ord("a"), ord("z") + 1)]
         + [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)] + WORDS + ["##ing", "##ed", "##er", "##ly"])
# Row 2 is shorter than the others: it is right-padded under the attention mask.
TEXTS = [("The quick brown fox jumps over the [MASK] dog!!", ""),
         ("A cat sat on the mat!", "Is it happy?"),
         ("Hëy €!", "")]


def main() -> None:
    torch.manual_seed(0)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    with open(os.path.join(OUT, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in VOCAB))
    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "strip_accents": None,
                   "tokenize_chinese_chars": True, "model_max_length": 64, "unk_token": "[UNK]",
                   "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}, f,
                  indent=2)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     num_labels=3, hidden_act="gelu", architectures=["BertForPreTraining"])
    pre = transformers.BertForPreTraining(config)
    seq = transformers.BertForSequenceClassification(config)
    with torch.no_grad():  # every tensor random (LayerNorm scales around 1), so that no mapping error hides
        for model in (pre, seq):
            for name, p in model.named_parameters():
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "LayerNorm.weight" in name else 0.0))
    seq.bert.load_state_dict(pre.bert.state_dict())
    tensors = {k: v.contiguous() for k, v in pre.state_dict().items() if not k.startswith("cls.predictions.decoder")}
    tensors.update({k: v.contiguous() for k, v in seq.state_dict().items() if k.startswith("classifier.")})
    save_file(tensors, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(OUT)

    # transformers' outputs, from the folder as transformers reads it
    tok = transformers.AutoTokenizer.from_pretrained(OUT)
    firsts, seconds = [a for a, _ in TEXTS], [b for _, b in TEXTS]
    enc = tok([[a, b] if b else a for a, b in TEXTS], padding=True, return_tensors="pt")
    kw = dict(attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        base = transformers.BertModel.from_pretrained(OUT, **kw).eval()
        mlm = transformers.BertForMaskedLM.from_pretrained(OUT, **kw).eval()
        cls = transformers.BertForSequenceClassification.from_pretrained(OUT, **kw).eval()
        hidden = base(**enc).last_hidden_state
        mlm_logits = mlm(**enc).logits
        cls_logits = cls(**enc).logits
    assert enc["attention_mask"][2].min() == 0 and enc["attention_mask"][:2].min() == 1
    np.savez_compressed(os.path.join(OUT, "expected.npz"), first=np.array(firsts), second=np.array(seconds),
                        input_ids=enc["input_ids"].numpy(), token_type_ids=enc["token_type_ids"].numpy(),
                        attention_mask=enc["attention_mask"].numpy(), hidden=hidden.numpy(),
                        mlm_logits=mlm_logits.numpy(), cls_logits=cls_logits.numpy())
    sizes = {n: os.path.getsize(os.path.join(OUT, n)) for n in sorted(os.listdir(OUT))}
    print(f"wrote {OUT}: {sizes} ({sum(sizes.values()) / 1e3:.0f} KB); transformers {transformers.__version__}, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
