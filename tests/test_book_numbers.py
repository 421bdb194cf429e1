"""A chapter's prose types no measured number by hand: such numbers are glued.

The project's rule ("every sentence true"): a number that the prose states and the code computed
is glued where it is computed (``glue("ch04_err", value)``) and referenced in the markdown
(``{glue:text}`ch04_err:.3f```), so a re-run cannot leave the sentence behind. This test reads
the markdown cells of ``book/*.ipynb`` and flags every *measured-looking* number typed outside a
glue reference. The rules, strict but practical:

What is looked at: the prose of markdown cells, after removing
  * fenced code blocks, display math (``$$...$$``, ``\\begin{...}...\\end{...}``, ``{math}``
    blocks) and inline math ``$...$`` (settings and formulas live there);
  * roles and code spans: ``{glue:text}`...``` (the point), ``{cite}`...``` (a citation, which
    marks the sentence as quoting), ``{numref}``/``{ref}``/``{eq}`` and any ```code```;
  * link targets (``[text](url)`` keeps ``text``), bare URLs, HTML tags and comments;
  * headings (lines starting with ``#``: section titles such as "Lemma 2.1") and the option
    lines of directives (``:label: ...``).
What is a number: a decimal (``0.168``, ``4.7``, also ``4.7x``), a percentage (``98%``,
  ``12.5 %``) or a number in scientific notation (``3e-4``). Integers are not flagged: counts
  and sizes (1000 iterations, d = 10, 5 seeds) are settings far more often than measurements.
  Version strings (``2.13.0``) are not numbers.
What is exempt:
  * a reference: the number follows Lemma, Theorem, Proposition, Corollary, Definition,
    Section, Appendix, Fig., Figure, Table, Eq., eq., Algorithm, Chapter, Exercise, Step, or a
    software name with its version (Python 3.11, torch 2.13);
  * a quotation: its sentence says whose number it is: "paper", "papers", "report(s/ed)",
    "authors", "states"/"stated", "caption", or carries a citation;
  * a model's size: the number is followed by "parameters" or "M-parameter";
  * a plotted band's quantiles ("the 10–90% band");
  * a bound: it follows "more than", "less than", "at least", "at most", "below", "above",
    "within", "under", "over", "exceeds", "up to" or "between" ("its error drops by more than
    30%"): the sentence states what an assert checks, which the project's rules require of a
    comparative sentence (this test does not look for the assert);
  * a setting: it directly follows a parameter's name or symbol, with or without ``=``, ``:``,
    "of" or "is" between (τ = 0.01, α 1.5, lr 0.1, radius 0.5, a fraction of 20%; the names are
    in ``SETTING_NAMES``);
  * an entry of ``ALLOW``: per chapter, the exact number and the reason it is typed.

Everything else fails, with the chapter, the cell and the sentence, so the fix is to glue it,
to say it is the paper's, or (a true setting written another way) to add it to ``ALLOW`` with
its reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))

# (chapter number, number as typed) -> why it may stay typed. Keep it short: a measured number
# is glued, a setting is best written next to its name (τ = 0.01), where no entry is needed.
ALLOW: dict[tuple[str, str], str] = {
    ("01", "20%"): "robust_mean's trim = 0.2 (the trimmed mean drops 20% at each end)",
    ("01", "25%"): "a corruption fraction of robust_mean's breakdown_fractions grid",
    ("05", "0.01"): "the absolute slack of the fixed-point assert (3 standard errors + 0.01)",
    ("05", "9.5"): "sample_median_sgd's start = 3 in each of dim = 10 coordinates: |e_0| = 3 sqrt(10) = 9.49",
    ("06", "80%"): "in_the_wild's test_fraction = 0.2: the train/test split",
    ("06", "20%"): "in_the_wild's test_fraction = 0.2 and corrupt_prob = 0.2",
    ("08", "0.3"): "beyond's lp_threshold = 0.3 (the error that defines 'speed')",
    ("08", "25%"): "beyond's cc_outliers = 0.25",
    ("09", "45%"): "gm_breakdown's panel_fractions (0, 0.1, 0.3, 0.45)",
    ("10", "5%"): "bgmd_theory's 'sparse' profile: 1 on the first 5% of the columns",
    ("10", "10%"): "a block fraction k/d = 0.1 of bgmd_theory's k_fractions / residual_betas",
    ("10", "20%"): "bgmd_theory's lemma5_psi = 0.2 (the corrupted fraction)",
    ("11", "20%"): "a corrupted fraction of bgmd_memory's psis (0, 0.1, 0.2, 0.4)",
    ("11", "40%"): "a corrupted fraction of bgmd_memory's psis (0, 0.1, 0.2, 0.4)",
    ("11", "0.01"): "the paper-scale learning rate of bgmd_training (lr = 0.01)",
    ("11", "1%"): "the paper-scale learning-rate decay of bgmd_training (lr_decay = 0.99 per epoch)",
    ("12", "10%"): "a corrupted fraction of attacks.PSI_LEVELS (0, 0.1, 0.2, 0.4)",
    ("12", "20%"): "a corrupted fraction of attacks.PSI_LEVELS (0, 0.1, 0.2, 0.4)",
    ("12", "40%"): "a corrupted fraction of attacks.PSI_LEVELS (0, 0.1, 0.2, 0.4)",
    ("12", "90%"): "the impulse attack's amount = 0.9 (pixels set to 0 or 1)",
    ("12", "5%"): "a block fraction beta = 0.05 of bgmd_experiments' fig6 grid",
    ("12", "95%"): "the confidence level of bgmd_experiments.mean_interval (T975)",
}

# Names and symbols of settings: a number right after one of them is a setting.
SETTING_NAMES = (
    r"τ|tau|α|alpha|β|beta|γ|gamma|σ|sigma|σ_0|σ_1|ψ|psi|ν|nu|ε|eps|epsilon|δ|delta|λ|lambda|η|eta"
    r"|η_0|ρ|rho|p|q|lr|learning rate|learning rates|step size|step sizes|steps? of|radius|radii"
    r"|tolerance|tol|threshold|fraction|fractions|probability|scale|scales|noise scale"
    r"|noise level|noise levels|momentum|weight decay|decay|tail index|tail indices|exponent"
    r"|max_norm|trim|trimmed|corrupted fraction|corruption|β = k/d|k/d"
)
REFERENCE_WORDS = (
    r"Lemmas?|Theorems?|Propositions?|Corollar(?:y|ies)|Definitions?|Assumptions?|Remarks?"
    r"|Sections?|Sec\.|§|Appendix|Appendices|App\.|Figs?\.|Figures?|Tables?|Eqs?\.|eqs?\."
    r"|equations?|Algorithms?|Alg\.|Chapters?|chapters?|Exercises?|Steps?|Examples?"
    r"|Python|PyTorch|torch|CUDA|NumPy|numpy|matplotlib|myst-nb|Jupyter Book|version|v"
)
QUOTE = re.compile(r"\b(?:papers?|paper's|reports?|reported|reporting|authors?|authors'|states|stated"
                   r"|caption)\b"
                   r"|\bCITE\b", re.IGNORECASE)
NUMBER = re.compile(
    r"(?<![\w.\-])(?:"
    r"\d+(?:\.\d+)?\s?%|\d+(?:\.\d+)?\s?percent"  # percentages
    r"|\d+(?:\.\d+)?[eE][-+]?\d+"  # scientific notation
    r"|\d*\.\d+(?!\.?\d)"  # decimals, not versions like 2.13.0
    r")"
)
REFERENCE_BEFORE = re.compile(rf"(?:{REFERENCE_WORDS})\s*\(?[\d.,\s–\-]*(?:and|or|&|to)?\s*[\d.,\s–\-]*$")
SETTING_BEFORE = re.compile(rf"(?:^|[\s(,;])(?:{SETTING_NAMES})\s*(?:=|:|of|is|at|to|from|\u2264|<=|≤|≥|>=)?\s*[\d.,\s%–\-]*$",
                            re.IGNORECASE)
# A bound ("more than 30%", "within 20%", "below 1%"): the sentence states what an assert checks.
BOUND_BEFORE = re.compile(r"\b(?:more than|less than|fewer than|at least|at most|below|above|within|under"
                          r"|over|exceeds?|up to|between)\s+(?:the\s+|a\s+|an\s+)?(?:factor of\s+)?[\d.,\s–\-]*(?:and\s+)?$",
                          re.IGNORECASE)
BAND_AFTER = re.compile(r"^\s*(?:band|bands|quantiles?|percentiles?|interval)\b"  # "10–90% band"
                        r"|^[MkK]?-?\s?parameters?\b")  # a model's size: "the 1.16M-parameter LeNet"
SYMBOL_EQUALS = re.compile(r"[A-Za-zα-ωΑ-Ω_\\]\w*\s*(?:=|≤|≥|<=|>=)\s*$")  # "x = 0.5", a setting typed as text

ROLE = re.compile(r"\{([\w:.-]+)\}`[^`]*`")
FENCE = re.compile(r"^(?P<fence>`{3,}|:{3,})\s*(?P<info>\S*)")


def _prose(markdown: str) -> str:
    """The prose of a markdown cell, with code, math, roles, links and headings removed."""
    lines, out, fence, keep = markdown.split("\n"), [], None, True
    for line in lines:
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence) and stripped.strip(fence[0]) == "":
                fence = None
                continue
            if keep and not re.match(r"^:[\w-]+:", stripped):
                out.append(line)
            continue
        match = FENCE.match(stripped)
        if match:
            fence, info = match.group("fence"), match.group("info")
            # directives with prose inside (lemmas, exercises, admonitions) are read; code and
            # math blocks are not
            keep = info.startswith("{") and not re.match(r"\{(?:math|code|code-cell|code-block)\}", info)
            continue
        if stripped.startswith("#"):
            continue
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", " MATH ", text, flags=re.S)
    text = re.sub(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", " MATH ", text, flags=re.S)
    text = re.sub(r"(?<![\\$])\$(?!\$)(?:\\.|[^$\\])+\$", " MATH ", text)

    def role(m: re.Match) -> str:
        name = m.group(1)
        return " CITE " if name.startswith("cite") else " GLUE " if name.startswith("glue") else " REF "

    text = ROLE.sub(role, text)
    text = re.sub(r"`[^`]*`", " CODE ", text)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images keep their text
    text = re.sub(r"<https?://[^>]*>|https?://\S+", " URL ", text)
    text = re.sub(r"<[^>]+>", " ", text)
    return text


def _sentences(text: str):
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        yield from re.split(r"(?<=[.!?])\s+(?=[A-Z(*\"'])", paragraph)


def hand_typed_numbers(path: Path) -> list[str]:
    """Every flagged number of a chapter: 'cell N: "number" in: sentence'."""
    chapter = path.name[:2]
    nb = json.loads(path.read_text(encoding="utf-8"))
    hits = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        for sentence in _sentences(_prose("".join(cell["source"]))):
            if QUOTE.search(sentence):
                continue
            for match in NUMBER.finditer(sentence):
                number, before = match.group(0), sentence[: match.start()]
                if REFERENCE_BEFORE.search(before[-40:]) or SETTING_BEFORE.search(before[-40:]):
                    continue
                if (SYMBOL_EQUALS.search(before[-20:]) or BOUND_BEFORE.search(before[-40:])
                        or BAND_AFTER.match(sentence[match.end():])):
                    continue
                if (chapter, number) in ALLOW:
                    continue
                hits.append(f"cell {index}: {number!r} in: {sentence[:160]}")
    return hits


def test_the_rules_flag_measured_numbers_only():
    cell = (
        "The error falls to 0.168 after training, and VClip is 4.7x faster.\n\n"
        "It drops by more than 30%, and stays within 20% of the bound.\n\n"
        "With τ = 0.01 and a learning rate of 0.1, a fraction of 20% is corrupted.\n\n"
        "The median and 10–90% band over seeds. The paper reports 92.8% on Fashion-MNIST. Lemma 2.1 holds; see Fig. 2 and Section 7.1.\n\n"
        "It reaches {glue:text}`ch00_acc:.1f`% here, and $\\|m\\| = 0.25$ in math, `0.5` in code.\n\n"
        "A CUDA 12.4 build; {cite:t}`schaipp2023robust` measured 0.93.\n\n"
        "# 1.5 A heading\n\n```python\nx = 0.75\n```\n\n"
        ":::{exercise}\n:label: ex-1\nShow that the ratio is 1.41.\n:::\n"
    )
    text = _prose(cell)
    flagged = []
    for sentence in _sentences(text):
        if QUOTE.search(sentence):
            continue
        for match in NUMBER.finditer(sentence):
            before = sentence[: match.start()]
            if not (REFERENCE_BEFORE.search(before[-40:]) or SETTING_BEFORE.search(before[-40:])
                    or SYMBOL_EQUALS.search(before[-20:]) or BOUND_BEFORE.search(before[-40:])
                    or BAND_AFTER.match(sentence[match.end():])):
                flagged.append(match.group(0))
    assert flagged == ["0.168", "4.7", "1.41"], flagged


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_hand_typed_measured_numbers(path):
    hits = hand_typed_numbers(path)
    assert not hits, (
        f"{path.name}: {len(hits)} number(s) typed in the prose; glue them where they are computed "
        "({glue:text}`key:.3f`), say they are the paper's, or add a setting to ALLOW with its "
        "reason:\n  " + "\n  ".join(hits)
    )
