"""Train a BERT WordPiece tokenizer from scratch and write it as one tokenizer.json.

    python tokenizer.py --text_files 'wiki/AA/wiki_*' --out tokenizer.json
    python tokenizer.py --out tokenizer.json          # streams English Wikipedia from the Hugging Face Hub

The file fixes the contract every other script relies on: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, BERT
normalisation and pre-tokenisation, "[CLS] A [SEP] (B [SEP])" with token types 0/1, and a "##" WordPiece decoder.
Like Hugging Face's own tokenizer.json files it pads and truncates nothing. An --out named tokenizer.json gets a
tokenizer_config.json beside it, so that transformers.AutoTokenizer.from_pretrained(its folder) loads it.
"""
import itertools
import json
import os
import sys
import time
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm

import common
import corpus
from common import CLS_ID, SEP_ID, SPECIAL_TOKENS, UserError

SPECIAL_KEYS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")  # tokenizer_config.json names
MAX_VOCAB_SIZE = 1 << 20  # the trainer reserves ~70 bytes per token up front; 4x the largest common vocabularies
MODEL_MAX_LENGTH = 512  # model.py's default max_position, for tokenizer_config.json
# BERT's inputs; transformers 5's PreTrainedTokenizerFast returns no token types unless told.
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]


def build_tokenizer(vocab: dict[str, int] | None = None, cased: bool = False) -> Tokenizer:
    """An (untrained if vocab is None) BERT WordPiece tokenizer; vocab must hold SPECIAL_TOKENS at ids 0..4."""
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=not cased, lowercase=not cased)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
    return tok


def check_settings(vocab_size: int, min_frequency: int, limit_alphabet: int) -> None:
    """The trainer's ranges (outside them it aborts or overflows), checked before any document is read."""
    for flag, value, low, high in (("vocab_size", vocab_size, len(SPECIAL_TOKENS) + 1, MAX_VOCAB_SIZE),
                                   ("min_frequency", min_frequency, 0, 2**32 - 1),
                                   ("limit_alphabet", limit_alphabet, 1, 2**32 - 1)):
        if not low <= value <= high:
            raise UserError(f"--{flag} must be in [{low}, {high}], got {value}")


def train_tokenizer(documents: Iterable[str], vocab_size: int, cased: bool = False, min_frequency: int = 2,
                    limit_alphabet: int = 1000, batch_docs: int = 1000, show_progress: bool = False) -> Tokenizer:
    """Train a WordPiece vocabulary on documents (streamed in batches: memory does not grow with their number).

    The vocabulary can come out smaller than vocab_size when the corpus is small.
    """
    check_settings(vocab_size, min_frequency, limit_alphabet)
    tok = build_tokenizer(cased=cased)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, limit_alphabet=limit_alphabet,
                                        continuing_subword_prefix="##", show_progress=show_progress)
    docs = iter(documents)
    tok.train_from_iterator(iter(lambda: list(itertools.islice(docs, batch_docs)), []), trainer=trainer)
    for want_id, token in enumerate(SPECIAL_TOKENS):  # the trainer puts them first; the contract depends on it
        assert tok.token_to_id(token) == want_id, (token, tok.token_to_id(token))
    if tok.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise UserError("the corpus holds no text the tokenizer keeps (only control characters or whitespace?): "
                        "its vocabulary would be the special tokens alone")
    return tok


def vocab_size_warning(tok: Tokenizer, asked: int, min_frequency: int) -> str | None:
    """One line when the trained vocabulary's size is not the one asked for, saying why it can differ."""
    size = tok.get_vocab_size()
    if size > asked:
        return (f"warning: the vocabulary has {size} tokens, more than --vocab_size {asked}: the trainer keeps every "
                "character of the alphabet (up to --limit_alphabet) and its ## form whatever the size asked")
    if size < asked:
        return (f"warning: the vocabulary has {size} tokens, fewer than --vocab_size {asked}: the corpus has too few "
                f"distinct words and pieces occurring at least --min_frequency {min_frequency} times")
    return None


def for_transformers(tok: Tokenizer, model_max_length: int = MODEL_MAX_LENGTH) -> tuple[str, dict]:
    """tok as tokenizer.json text without padding or truncation (a copy is changed, not tok), and the
    tokenizer_config.json that transformers reads beside it: the special tokens' names, the normalisation and the
    model's length limit and inputs."""
    tok = Tokenizer.from_str(tok.to_str())
    tok.no_padding()
    tok.no_truncation()
    text = tok.to_str(pretty=True)
    normalizer = json.loads(text).get("normalizer") or {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "do_lower_case": normalizer.get("lowercase", True), "strip_accents": normalizer.get("strip_accents"),
              "tokenize_chinese_chars": normalizer.get("handle_chinese_chars", True),
              "model_input_names": MODEL_INPUT_NAMES, **dict(zip(SPECIAL_KEYS, SPECIAL_TOKENS))}
    return text, config


def _with_progress(documents: Iterable[str], stats: dict) -> Iterator[str]:
    """Show documents and bytes read while the trainer consumes them."""
    with tqdm(desc="reading", unit="B", unit_scale=True, unit_divisor=1000) as bar:
        for doc in documents:
            bar.update(stats["bytes"] - bar.n)
            bar.set_postfix(docs=stats["docs"], refresh=False)
            yield doc
        bar.update(stats["bytes"] - bar.n)
        bar.set_postfix(docs=stats["docs"])


def main() -> None:
    p = common.ArgumentParser(__doc__)
    p.add_argument("--out", default="tokenizer.json",
                   help="where to write the tokenizer; named tokenizer.json, it gets a tokenizer_config.json beside "
                        "it for transformers (default: tokenizer.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its tokenizer_config.json) if they "
                                                             "exist; without it they are refused")
    p.add_argument("--vocab_size", type=common.int_in(len(SPECIAL_TOKENS) + 1, MAX_VOCAB_SIZE), default=32768,
                   help=f"vocabulary size including the 5 special tokens, at most {MAX_VOCAB_SIZE} (default: 32768, "
                        "a multiple of 128 so the embedding and output matrices tile evenly on GPU/TPU matrix units)")
    p.add_argument("--cased", action="store_true",
                   help="keep case and accents (default: lowercase and strip accents, like bert-base-uncased)")
    p.add_argument("--min_frequency", type=common.int_in(0, 2**32 - 1), default=2,
                   help="a pair must occur this often to be merged into a new token (default: 2)")
    p.add_argument("--limit_alphabet", type=common.int_in(1, 2**32 - 1), default=1000,
                   help="keep at most this many distinct characters; rarer ones become [UNK] (default: 1000)")
    corpus.add_source_args(p)
    args = p.parse_args()

    # tokenizer_config.json goes beside an --out named tokenizer.json, else nowhere (a folder of tokenizers with
    # other names would have one settings file for them all)
    settings_path = (os.path.join(os.path.dirname(args.out), "tokenizer_config.json")
                     if os.path.basename(args.out) == "tokenizer.json" else None)
    for path in filter(None, (args.out, settings_path)):
        common.check_new_file(path, args.overwrite)
    common.check_writable_folder(os.path.dirname(os.path.abspath(args.out)))
    stats: dict = {}
    documents = corpus.require_documents(corpus.documents_from_args(args, stats), stats)
    start = time.time()
    tok = train_tokenizer(_with_progress(documents, stats), args.vocab_size, cased=args.cased,
                          min_frequency=args.min_frequency, limit_alphabet=args.limit_alphabet)
    size_warning = vocab_size_warning(tok, args.vocab_size, args.min_frequency)
    text, config = for_transformers(tok)
    # Both or neither (a full disk leaves no orphan that blocks a rerun); tokenizer.json renamed in last
    common.atomic_write_files({**({settings_path: common.json_bytes(config)} if settings_path else {}),
                               args.out: text.encode()})
    print(f"wrote {args.out}: vocab {tok.get_vocab_size()} (asked {args.vocab_size}), {stats['docs']} docs, "
          f"{stats['bytes'] / 1e6:.1f} MB, {stats['replaced_bytes']} undecodable bytes replaced, "
          f"{time.time() - start:.1f} s")
    if size_warning:
        print(size_warning, file=sys.stderr)


if __name__ == "__main__":
    common.run_main(main)
