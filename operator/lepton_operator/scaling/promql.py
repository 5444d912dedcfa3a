"""Tenant scoping of a user's PromQL (pure).

A LeptonJob or LeptonModel carries PromQL that the operator evaluates with its own
access to Prometheus (and hands to KEDA). ``scope`` confines such a query to the
object's namespace: it parses the query with ``promql-parser`` (a PromQL parser),
refuses a selector whose ``namespace`` matcher is anything but
``namespace="<own namespace>"`` (another value, ``!=``, ``=~``, ``!~``), adds
``namespace="<own namespace>"`` to every vector and range selector that has none
(inside functions, aggregations, subqueries and ``@``/``offset`` modifiers alike) and
prints the result. A query without any selector (``vector(1)``, ``time()``) reads no
series, so it stays as it is.

The label is the target label Prometheus' Kubernetes service discovery gives every
series it scrapes from a pod (``namespace``); a workload cannot set it for itself.

The query that comes back is printed by the parser from the rewritten syntax tree, then
parsed again and checked: every selector in it selects exactly the own namespace, and it
is the same tree. A query that does not parse, or that cannot be scoped, raises
``ScopeError`` with the reason.
"""
from __future__ import annotations

import re

import promql_parser as pp

__all__ = ["NAMESPACE_LABEL", "ScopeError", "scope"]

NAMESPACE_LABEL = "namespace"
# Line breaks of the parser's pretty printer lie between tokens (a string literal is
# printed with its line breaks escaped), so they fold into one line.
_AFTER_OPEN = re.compile(r"\(\n\s*")
_BEFORE_CLOSE = re.compile(r"\n\s*\)")
_BREAK = re.compile(r"\n\s*")


class ScopeError(ValueError):
    """A query that cannot be evaluated in one namespace (the message says why)."""


def _matcher(namespace: str) -> pp.Matcher:
    return pp.Matcher(pp.MatchOp.Equal, NAMESPACE_LABEL, namespace)


def _ns_matchers(sel: pp.VectorSelector) -> list[pp.Matcher]:
    return [m for m in sel.matchers.matchers if m.name == NAMESPACE_LABEL]


def _shown(m: pp.Matcher) -> str:
    return f'namespace "{m.value}"' if m.op == pp.MatchOp.Equal else f"{m}"


def _refusal(sel: pp.VectorSelector, namespace: str) -> str | None:
    """Why the selector ``sel`` reaches outside ``namespace`` (None: it does not)."""
    if sel.matchers.or_matchers:
        return f"{sel.prettify()} uses 'or' between label matchers, which cannot be confined to one namespace"
    for m in _ns_matchers(sel):
        if m.op != pp.MatchOp.Equal or m.value != namespace:
            return f'selects {_shown(m)}; queries are evaluated in namespace "{namespace}" only'
    return None


def _selectors(tree: pp.Expr) -> list[pp.VectorSelector]:
    """Every vector selector in ``tree``, those of range selectors included."""
    found: list[pp.VectorSelector] = []
    pp.walk(tree, pre_visit=lambda e: found.append(e) if isinstance(e, pp.VectorSelector) else None)
    return found


def _scoped_selector(sel: pp.VectorSelector, namespace: str) -> pp.Expr:
    """``sel`` with ``namespace="<namespace>"`` added: its printed form with the matcher
    put first in its braces, parsed again and checked to be ``sel`` plus that matcher."""
    printed, name = sel.prettify(), sel.name or ""
    if not printed.startswith(name):
        raise ScopeError(f"cannot confine {printed} to a namespace")
    rest, added = printed[len(name):], str(_matcher(namespace))
    text = (f"{name}{{{added},{rest[1:]}" if rest.startswith("{") and not rest.startswith("{}")
            else f"{name}{{{added}}}{rest.removeprefix('{}')}")
    try:
        new = pp.parse(text)
    except ValueError:
        raise ScopeError(f"cannot confine {printed} to a namespace") from None
    want = sorted(map(str, [*sel.matchers.matchers, _matcher(namespace)]))
    if not (isinstance(new, pp.VectorSelector) and new.name == sel.name and new.offset == sel.offset
            and str(new.at) == str(sel.at) and sorted(map(str, new.matchers.matchers)) == want):
        raise ScopeError(f"cannot confine {printed} to a namespace")
    return new


def _one_line(printed: str) -> str:
    return _BREAK.sub(" ", _BEFORE_CLOSE.sub(")", _AFTER_OPEN.sub("(", printed.strip())))


def scope(query: str, namespace: str) -> str:
    """``query`` with every selector confined to ``namespace``; raises ``ScopeError``
    when it does not parse or selects another namespace."""
    try:
        tree = pp.parse(query)
    except ValueError as exc:
        raise ScopeError(f"{query!r} is not valid PromQL: {exc}") from None
    for sel in _selectors(tree):
        why = _refusal(sel, namespace)
        if why:
            raise ScopeError(why)
    scoped = pp.transform(tree, post_visit=lambda e: _scoped_selector(e, namespace)
                          if isinstance(e, pp.VectorSelector) and not _ns_matchers(e) else None)
    text = _one_line(scoped.prettify())
    try:
        again = pp.parse(text)
    except ValueError:
        again = None
    if again is None or again.prettify() != scoped.prettify() or any(
            _refusal(sel, namespace) or not _ns_matchers(sel) for sel in _selectors(again)):
        raise ScopeError(f"cannot be confined to namespace {namespace!r}")
    return text

