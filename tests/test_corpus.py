"""corpus.py: the document sources of tokenizer.py and data.py (local files in three formats, the Hub)."""
import pytest

import corpus
from common import UserError

WIKI = """<doc id="1" url="?curid=1" title="Empty page">
Empty page


</doc>
<doc id="2" url="?curid=2" title="River">
River

A river flows.
History.
It is old.
</doc>
<doc id="3" url="?curid=3" title="Only title">
Only title
</doc>
<doc id="4" url="?curid=4" title="City">
City
A city.
</doc>
"""


def read(paths, **kw):
    stats = {}
    return list(corpus.iter_documents([str(p) for p in paths], stats=stats, **kw)), stats


def test_wikiextractor_docs_drop_title_and_skip_empty(tmp_path):
    (tmp_path / "wiki_00").write_text(WIKI)
    docs, stats = read([tmp_path / "wiki_00"])
    assert docs == ["A river flows.\nHistory.\nIt is old.", "A city."]
    assert stats["docs"] == 2 and stats["bytes"] == len(WIKI.encode()) and stats["replaced_bytes"] == 0


def test_wikiextractor_malformed_is_user_error(tmp_path):
    (tmp_path / "cut").write_text(WIKI + '<doc id="5" title="x">\nx\nbody\n')
    with pytest.raises(UserError, match="without </doc>"):
        read([tmp_path / "cut"])
    (tmp_path / "stray").write_text("stray text\n" + WIKI)
    with pytest.raises(UserError, match="outside a <doc>"):
        read([tmp_path / "stray"], fmt="wikiextractor")


def test_jsonl_and_plain_text(tmp_path):
    (tmp_path / "a.jsonl").write_text('\ufeff{"text": "first doc", "id": 1}\n\n{"text": ""}\n{"text": "second\\ndoc"}\n')
    (tmp_path / "b.txt").write_text("line one\n\n   \nline two\r\n")
    docs, stats = read([tmp_path / "a.jsonl", tmp_path / "b.txt"])
    assert docs == ["first doc", "second\ndoc", "line one", "line two"]
    assert stats["sources"] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]
    # --format text overrides the sniffing: each JSON line is then a plain-text document
    docs, _ = read([tmp_path / "a.jsonl"], fmt="text")
    assert docs[0] == '{"text": "first doc", "id": 1}' and len(docs) == 3


def test_jsonl_without_text_field_is_user_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"a\.jsonl:2: .*'text'"):
        read([tmp_path / "a.jsonl"])


def test_undecodable_bytes_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok\nfine \xff\xfe line\nclean \xef\xbf\xbd kept\n")
    docs, stats = read([tmp_path / "bad.txt"])
    assert docs == ["caf\ufffd ok", "fine \ufffd\ufffd line", "clean \ufffd kept"]
    assert stats["replaced_bytes"] == 3  # the real U+FFFD in line 3 is text, not a replaced byte


def test_num_docs_cap_globs_and_dedup(tmp_path):
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text("".join(f"doc {i} {j}\n" for j in range(4)))
    docs, stats = read([tmp_path / "f*.txt", tmp_path / "f0.txt"], num_docs=0)
    assert len(docs) == 12 and len(stats["sources"]) == 3
    docs, stats = read([tmp_path / "f*.txt"], num_docs=5)
    assert docs == [f"doc 0 {j}" for j in range(4)] + ["doc 1 0"] and stats["docs"] == 5
    docs, _ = read([tmp_path / "f*.txt"])  # the default: every document of the given files
    assert len(docs) == 12


def test_a_line_over_the_limit_is_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MAX_LINE_BYTES", 1 << 20)
    (tmp_path / "ok.txt").write_bytes(b"a" * ((1 << 20) - 1) + b"\nb")  # the newline counts: exactly the limit
    assert [len(d) for d in read([tmp_path / "ok.txt"])[0]] == [(1 << 20) - 1, 1]
    (tmp_path / "one_line.txt").write_bytes(b"x" * (3 << 20))  # no newline at all
    (tmp_path / "long.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "' + b"y" * (2 << 20) + b'"}\n')
    for name, where in (("one_line.txt", "one_line.txt:1"), ("long.jsonl", "long.jsonl:2")):
        with pytest.raises(UserError, match=f"{where}: line longer than 1 MiB, the limit"):
            read([tmp_path / name])


def test_bad_paths_fail_at_call_time(tmp_path):
    with pytest.raises(UserError, match="no files match"):
        corpus.iter_documents([str(tmp_path / "nothing*")])
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        corpus.iter_documents([str(tmp_path / "*")])


def test_open_failure_is_user_error(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("x\n")
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("a.txt"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(UserError, match="cannot read .*a.txt: Permission denied"):
        corpus.iter_documents([str(tmp_path / "a.txt")])


def test_hub_source_streams_the_text_field(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "one"}, {"text": "  "}, {"text": "two"}, {"text": "three"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # skips the connection check
    stats = {}
    docs = list(corpus.iter_documents(None, num_docs=2, hf_dataset="d", hf_config="c", hf_split="s", stats=stats))
    assert docs == ["one", "two"] and calls == [("d", "c", "s", True)]
    assert stats["sources"] == ["hf:d/c[s]"]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ({"text": f"doc {i}"} for i in range(10**6)))
    docs = list(corpus.iter_documents(None, hf_dataset="d", hf_config="c", hf_split="s"))
    assert len(docs) == corpus.DEFAULT_HUB_DOCS  # the default: a slice of the Hub corpus, not all of it
