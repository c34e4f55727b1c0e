"""Every example in README.md, docs/*.md and the configs' header commands runs (doc tests).

One test item per block, in document order; the blocks of a page share a working directory and
a Python namespace (see ``jaxarith/testing/docs.py`` for the markers and substitutions). Blocks
marked ``<!-- doctest: skip reason=... -->`` are reported as skipped with their reason.
"""

import os

import pytest

from jaxarith import testing
from jaxarith.testing.docs import FIXTURE_NAMES, DocRunner, document_blocks, extract_markdown

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = document_blocks(REPO)
ITEMS = [(doc, i) for doc, blocks in DOCS.items() for i in range(len(blocks))]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Three tiny Llamas of one architecture (different weights) with the bundled tokenizer."""
    root = tmp_path_factory.mktemp("doc_fixtures")
    out = {}
    for seed, name in enumerate(sorted(set(FIXTURE_NAMES.values()))):
        d = root / name
        testing.make_hf_model(d, testing.tiny_llama_config(), seed=seed)
        out[name] = str(d)
    return out


@pytest.fixture(scope="module")
def runners(fixtures, tmp_path_factory):
    """One runner per document (its working directory and namespace), created on first use."""
    made: dict[str, DocRunner] = {}
    failed: dict[str, str] = {}
    tmp = str(tmp_path_factory.mktemp("doc_tmp"))  # "/tmp/" of every page

    def get(doc):
        if doc not in made:
            made[doc] = DocRunner(str(tmp_path_factory.mktemp(doc.replace("/", "_"))),
                                  fixtures, REPO, tmp=tmp)
        return made[doc]

    yield get, failed
    for r in made.values():
        r.close()


@pytest.mark.parametrize("doc,index", ITEMS,
                         ids=[f"{d}:{DOCS[d][i].line}-{DOCS[d][i].lang}" for d, i in ITEMS])
def test_doc_block(doc, index, runners):
    get, failed = runners
    block = DOCS[doc][index]
    if block.skip:
        pytest.skip(f"{block.where}: {block.skip}")
    if doc in failed:
        pytest.skip(f"{block.where}: not run, an earlier block of {doc} failed ({failed[doc]})")
    try:
        get(doc).run(block)
    except BaseException:
        failed[doc] = block.where
        raise


def test_markers_are_parsed():
    text = (
        "text\n<!-- doctest: skip reason=\"needs a TPU pod\" -->\n```bash\npython -m x\n```\n"
        "<!-- doctest: file=m.yaml -->\n```yaml\na: 1\n```\n"
        "<!-- doctest: setup\nx = 1\n-->\n```python\nprint(x)\n```\n"
        "<!-- doctest: skip reason=old -->\n\nsome prose\n```bash\nls\n```\n"
        "```json\n{}\n```\n"
    )
    blocks = extract_markdown("t.md", text)
    assert [(b.lang, b.skip, b.file, b.line) for b in blocks] == [
        ("bash", "needs a TPU pod", None, 4), ("file", None, "m.yaml", 8),
        ("setup", None, None, 10), ("python", None, None, 14), ("bash", None, None, 20)]
    assert blocks[1].code == "a: 1\n" and blocks[2].code == "x = 1"
    with pytest.raises(ValueError, match="t.md:1: unknown doctest marker"):
        extract_markdown("t.md", "<!-- doctest: skpi -->\n")


def test_relative_links_point_inside_the_repository():
    """README/docs links to local files exist and stay inside the repository."""
    import re

    bad = []
    for doc in [d for d in DOCS if d.endswith(".md")]:
        text = open(os.path.join(REPO, doc), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            path = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), target))
            if not path.startswith(REPO + os.sep) or not os.path.exists(path):
                bad.append(f"{doc}: {target}")
    assert bad == []
