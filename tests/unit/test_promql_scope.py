"""Tenant scoping of user PromQL: every selector confined to the object's namespace."""
import promql_parser
import pytest

from lepton_operator.job import autoscale, progress
from lepton_operator.job.spec import InvalidSpec, parse_job
from lepton_operator.model import objects
from lepton_operator.model.spec import parse_model, scoped_query
from lepton_operator.scaling.promql import ScopeError, scope

NS = "team-a"


def selectors(query: str) -> list[promql_parser.VectorSelector]:
    found = []
    promql_parser.walk(promql_parser.parse(query),
                       pre_visit=lambda e: found.append(e) if isinstance(e, promql_parser.VectorSelector) else None)
    return found


def namespaces(sel) -> list[tuple[str, str]]:
    return [(str(m.op), m.value) for m in sel.matchers.matchers if m.name == "namespace"]


@pytest.mark.parametrize("query,scoped", [
    ("sum(x)", 'sum(x{namespace="team-a"})'),
    ('sum(rate(x{a="b"}[5m] offset 1m))', 'sum(rate(x{a="b",namespace="team-a"}[5m] offset 1m))'),
    ('x{namespace="team-a"} / y', 'x{namespace="team-a"} / y{namespace="team-a"}'),
    ('{__name__=~"lepton_.+"}', '{__name__=~"lepton_.+",namespace="team-a"}'),
    ('absent(up{job="x"})', 'absent(up{job="x",namespace="team-a"})'),
    ('label_replace(up, "namespace", "other", "", "")',
     'label_replace(up{namespace="team-a"}, "namespace", "other", "", "")'),
    ("max_over_time(rate(x[1m])[5m:30s] @ end())", 'max_over_time(rate(x{namespace="team-a"}[1m])[5m:30s] @ end())'),
    ("x @ start() offset 5m", 'x{namespace="team-a"} @ start() offset 5m'),
    ("a / on (pod) group_left (x) b", 'a{namespace="team-a"} / on (pod) group_left (x) b{namespace="team-a"}'),
    ('x{"dotted.label"="v"}', 'x{"dotted.label"="v",namespace="team-a"}'),
    ("sum(x) # a comment\n + y", 'sum(x{namespace="team-a"}) + y{namespace="team-a"}'),
    ("vector(1) + time()", "vector(1) + time()"),
])
def test_every_selector_gets_the_own_namespace(query, scoped):
    assert scope(query, NS) == scoped


def test_a_long_query_comes_back_on_one_line_with_every_selector_scoped():
    query = ('(sum(rate(lepton_serve_requests_total{lepton_model="m",code!~"2.."}[1m])) or vector(0))\n'
             '/ sum(rate(lepton_serve_requests_total{lepton_model="m"}[1m]))')
    out = scope(query, NS)
    assert "\n" not in out
    assert [namespaces(s) for s in selectors(out)] == [[("MatchOp.Equal", NS)]] * 2
    # The same tree as the query with the matcher added by hand.
    by_hand = query.replace('lepton_model="m"', f'lepton_model="m",namespace="{NS}"')
    assert promql_parser.parse(out).prettify() == promql_parser.parse(by_hand).prettify()


def test_a_string_with_a_line_break_keeps_it():
    out = scope('label_replace(x, "a", "1\\n2", "b", "(.*)")', NS)
    assert promql_parser.parse(out).args[2].val == "1\n2"


@pytest.mark.parametrize("query,shown", [
    ('sum(x{namespace="other"})', 'selects namespace "other"'),
    ('x{namespace!="team-a"}', 'selects namespace!="team-a"'),
    ('x{namespace=~"team-.*"}', 'selects namespace=~"team-.*"'),
    ('x{namespace!~"team-b"}', 'selects namespace!~"team-b"'),
    ('x{namespace="team-a",namespace=~".+"}', 'selects namespace=~".+"'),
    ('x{"namespace"="other"}', 'selects namespace "other"'),
    ('rate(x{namespace="other"}[5m])', 'selects namespace "other"'),
    ('x{namespace="team-a"} + on() group_left absent(y{namespace=""})', 'selects namespace ""'),
    ('max_over_time(x{namespace="other"}[1h:1m] @ 0)', 'selects namespace "other"'),
])
def test_another_namespace_is_refused(query, shown):
    with pytest.raises(ScopeError) as exc:
        scope(query, NS)
    assert str(exc.value) == f'{shown}; queries are evaluated in namespace "team-a" only'


def test_or_between_matchers_and_bad_promql_are_refused():
    with pytest.raises(ScopeError, match="'or' between label matchers"):
        scope('x{a="1" or b="2"}', NS)
    with pytest.raises(ScopeError, match="'sum[(]x' is not valid PromQL: .*parenthesis"):
        scope("sum(x", NS)


def test_the_own_namespace_stays_as_it_is():
    assert scope('sum(x{namespace="team-a"})', NS) == 'sum(x{namespace="team-a"})'


MODEL = {"source": {"uri": "pvc://models/m"}}


def test_model_queries_naming_another_namespace_are_invalid_specs():
    spec = {**MODEL, "rollout": {"analysis": [{"name": "ok", "query": 'sum(x{namespace="${namespace}"})', "max": 1},
                                              {"name": "bad", "query": 'sum(x{namespace="other"})', "max": 1}]},
            "autoscaling": {"engine": "keda", "metric": "query", "target": 1, "query": "sum(rate(y[1m]"}}
    with pytest.raises(InvalidSpec) as exc:
        parse_model("m", spec, "img", namespace=NS)
    assert exc.value.problems == [
        'rollout.analysis[1].query: selects namespace "other"; queries are evaluated in namespace "team-a" only',
        "autoscaling.query: 'sum(rate(y[1m]' is not valid PromQL: unclosed left parenthesis"]


def test_model_queries_are_sent_and_rendered_scoped():
    spec = parse_model("m", {**MODEL, "autoscaling": {"engine": "keda", "metric": "query", "target": 1,
                                                      "query": 'sum(q{model="${model}"})'}}, "img", namespace=NS)
    owner = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
             "metadata": {"name": "m", "namespace": NS, "uid": "u"}}
    keda = objects.scaled_object(owner, spec.autoscaling, "m-abc", "http://prom:9090")
    assert keda["spec"]["triggers"][0]["metadata"]["query"] == 'sum(q{model="m",namespace="team-a"})'
    assert scoped_query('max(e{rev="${revision}"})', NS, "m", "r1") == 'max(e{namespace="team-a",rev="r1"})'


def test_an_hpa_selects_only_its_own_namespaces_series():
    """An HPA carries no PromQL: its External metric's selector names the model and its
    namespace twice, the server's label and the scrape's, whatever the spec says."""
    owner = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
             "metadata": {"name": "m", "namespace": NS, "uid": "u"}}
    for metric in ("rps", "inflight", "p95latency"):
        spec = parse_model("m", {**MODEL, "autoscaling": {"engine": "hpa", "metric": metric, "target": 1}}, "img",
                           namespace=NS)
        (entry,) = objects.hpa(owner, spec.autoscaling, "m-abc")["spec"]["metrics"]
        assert entry["external"]["metric"]["selector"] == {
            "matchLabels": {"lepton_model": "m", "lepton_namespace": NS, "namespace": NS}}
    with pytest.raises(InvalidSpec, match="needs engine builtin or keda"):
        parse_model("m", {**MODEL, "autoscaling": {"engine": "hpa", "metric": "query", "query": "sum(x)",
                                                   "target": 1}}, "img", namespace=NS)


def test_job_query_naming_another_namespace_is_an_invalid_spec():
    raw = {"autoscaling": {"query": 'sum(x{namespace=~".*"})'}}
    with pytest.raises(InvalidSpec, match='autoscaling.query: selects namespace=~".[*]"; queries are evaluated '
                                          'in namespace "team-a" only'):
        parse_job("j", raw, "img", namespace=NS)
    # A regular expression is refused in every namespace, even one it matches.
    with pytest.raises(InvalidSpec):
        parse_job("j", raw, "img", namespace="other")


def test_job_query_is_measured_scoped():
    spec = parse_job("j", {"autoscaling": {"query": 'max(samples{job="${job}"})'}}, "img", namespace=NS)
    assert autoscale.promql(spec, NS, "j") == 'max(samples{job="j",namespace="team-a"})'
    plain = parse_job("j", {"autoscaling": {}}, "img", namespace=NS)
    assert autoscale.promql(plain, NS, "j") == autoscale.default_query(NS, "j")


def test_the_operators_own_queries_are_scoped_as_written():
    """Built-in queries read only series scraped in the object's namespace, so a pod in
    another namespace that exports the same labels cannot steer them."""
    a = parse_model("m", {**MODEL, "autoscaling": {"metric": "rps", "target": 1}}, "img", namespace=NS).autoscaling
    for query in (objects.metric_query(a, NS, "m"), objects.traffic_query(NS, "m", "r1", 30),
                  autoscale.default_query(NS, "j"), progress.query(NS, "j")):
        assert promql_parser.parse(scope(query, NS)).prettify() == promql_parser.parse(query).prettify()
        assert all(namespaces(s) == [("MatchOp.Equal", NS)] for s in selectors(query))
