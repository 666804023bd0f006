"""A scene graph written as one line of text ("a red circle left of a large blue square").

Generated data sets carry it as their caption, so text-to-image training reads them as they are
(img2dataset's ``{key}.txt``). Deterministic: the same graph always reads the same.
"""

from __future__ import annotations

from sgmodel.graph import SceneGraph

VOWELS = frozenset("aeiou")


def _description(graph: SceneGraph, index: int) -> str:
    obj = graph.objects[index]
    return " ".join((*obj.attributes, obj.label)).strip()


def graph_caption(graph: SceneGraph) -> str:
    """One clause per relation ("a red circle left of a blue square"), then the objects no relation names.

    An object reads "a …" (or "an …") the first time, "another …" when an object of the same
    description came before it, and "the …" when named again.
    """
    mentioned: set[int] = set()
    seen_descriptions: set[str] = set()

    def mention(index: int) -> str:
        text = _description(graph, index)
        if index in mentioned:
            return f"the {text}"
        mentioned.add(index)
        if text in seen_descriptions:
            return f"another {text}"
        seen_descriptions.add(text)
        return f"{'an' if text[:1].lower() in VOWELS else 'a'} {text}"

    clauses = []
    for rel in graph.relations:
        subject = mention(rel.subject)
        clauses.append(f"{subject} {rel.predicate} {mention(rel.object)}")
    clauses.extend(mention(i) for i in range(len(graph.objects)) if i not in mentioned)
    if len(clauses) == 1:
        return clauses[0]
    return ", ".join(clauses[:-1]) + " and " + clauses[-1]
