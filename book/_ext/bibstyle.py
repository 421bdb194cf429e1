"""The bibliography's style: author-year labels, as the citations in the text.

The chapters cite author-year (``bibtex_reference_style: author_year``: "Schaipp et al. (2023)"),
so the references page lists each entry under the same label, "[Schaipp et al., 2023]", sorted by
first author, year and title (pybtex's ``plain`` formatting otherwise). pybtex's own ``alpha`` labels
("SSG23") are built from the raw BibTeX of the names and mangle accented ones such as
``{\\c{S}}im{\\c{s}}ekli``; these labels use the decoded names. Labels that coincide get a letter
after the year (2023a, 2023b).

Registered as the pybtex formatting style ``author_year`` (``bibtex_default_style`` in
``_config.yml``), loaded through ``sphinx: local_extensions``.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting import BaseSortingStyle


def _last_name(person) -> str:
    return Text(*person.rich_prelast_names, " ", *person.rich_last_names).render_as("text").strip()


class AuthorYearLabelStyle(BaseLabelStyle):
    """'Beck, 2017', 'Parikh and Boyd, 2014', 'Schaipp et al., 2023'."""

    def format_label(self, entry) -> str:
        persons = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_last_name(p) for p in persons]
        if not names:
            who = entry.fields.get("organization") or entry.fields.get("institution") or entry.key
        elif len(names) == 1:
            who = names[0]
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]}"
        else:
            who = f"{names[0]} et al."
        return f"{who}, {entry.fields.get('year', 'n.d.')}"

    def format_labels(self, sorted_entries):
        labels = [self.format_label(entry) for entry in sorted_entries]
        counts, seen = Counter(labels), Counter()
        for label in labels:
            if counts[label] > 1:
                seen[label] += 1
                label += "abcdefghijklmnopqrstuvwxyz"[seen[label] - 1]
            yield label


def _plain(text: str) -> str:
    """Lower case without accents, for sorting ('Şimşekli' between 'Schaipp' and 'Stich')."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()


class AuthorYearSortingStyle(BaseSortingStyle):
    """By label (first author, then 'and X' or 'et al.'), year and title: the order in which a
    reader looks up 'Karimireddy et al. (2019)' next to 'Karimireddy et al. (2021)'."""

    def sorting_key(self, entry):
        who = AuthorYearLabelStyle().format_label(entry).rsplit(", ", 1)[0]
        return (_plain(who), entry.fields.get("year", ""), _plain(entry.fields.get("title", "")))


class AuthorYearStyle(PlainStyle):
    default_label_style = AuthorYearLabelStyle
    default_sorting_style = AuthorYearSortingStyle


def setup(app):
    register_plugin("pybtex.style.labels", "author_year", AuthorYearLabelStyle)
    register_plugin("pybtex.style.sorting", "author_year", AuthorYearSortingStyle)
    register_plugin("pybtex.style.formatting", "author_year", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
