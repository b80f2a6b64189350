"""coild's Prometheus metrics (own registry, served at GET /metrics)."""

from __future__ import annotations


class CoildMetrics:
    def __init__(self, daemon):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        self.registry = CollectorRegistry()
        self._daemon = daemon
        self.cni_requests = Counter("coild_cni_requests_total", "CNI requests handled",
                                    ["command", "result"], registry=self.registry)
        self.gc_errors = Counter("coild_cni_gc_errors_total",
                                 "attachments CNI GC could not free", registry=self.registry)
        self.gc_freed = Counter("coild_cni_gc_freed_total",
                                "addresses freed by CNI GC", registry=self.registry)
        self.cni_seconds = Histogram("coild_cni_request_seconds", "CNI request time in coild",
                                     ["command"], registry=self.registry,
                                     buckets=(.001, .002, .005, .01, .02, .05, .1, .5, 1, 5))

        class _State:
            def collect(inner):
                snap = daemon.allocator.snapshot()
                blocks = GaugeMetricFamily("coild_blocks", "address blocks held", labels=["pool"])
                for pool, cidrs in snap["blocks"].items():
                    blocks.add_metric([pool], len(cidrs))
                yield blocks
                yield GaugeMetricFamily("coild_addresses_in_use", "addresses assigned on this node",
                                        value=daemon.allocator.count())
                keeper = getattr(daemon, "liveness", None)
                if keeper is not None:
                    yield GaugeMetricFamily("coild_liveness_ok", "1 while the last renewal of "
                                            "the node's liveness lease succeeded",
                                            value=1 if keeper.healthy else 0)
                    yield CounterMetricFamily("coild_liveness_renewal_errors",
                                              "failed renewals of the node's liveness lease",
                                              value=keeper.errors)
                teardown = getattr(daemon, "teardown", None)
                if teardown is not None:
                    yield GaugeMetricFamily("coild_teardown_pending",
                                            "veth pairs retired by DEL, waiting for the next batch",
                                            value=teardown.pending())
                    yield CounterMetricFamily("coild_teardown_retired",
                                              "veth pairs retired by DEL for batched deletion",
                                              value=teardown.retired_total)
                    yield CounterMetricFamily("coild_teardown_flushes",
                                              "batched deletions of retired veth pairs",
                                              value=teardown.flushes_total)
        self.registry.register(_State())

        class _Etcd:
            def collect(inner):
                from prometheus_client.core import CounterMetricFamily
                counters = getattr(getattr(daemon.store, "etcd", None), "counters", {})
                for name, key, text in (
                        ("coild_etcd_requests", "calls", "etcd calls made"),
                        ("coild_etcd_retries", "retries", "etcd attempts after a call's first"),
                        ("coild_etcd_member_errors", "member_errors",
                         "etcd members that failed an attempt (then the next one was tried)"),
                        ("coild_etcd_failovers", "failovers",
                         "calls answered by another etcd member than the previous call"),
                        ("coild_etcd_outcome_unknown", "outcome_unknown",
                         "transactions whose commit was not known"),
                        ("coild_etcd_token_renewals", "renewals", "etcd auth tokens renewed")):
                    yield CounterMetricFamily(name, text, value=counters.get(key, 0))
                yield CounterMetricFamily("coild_pool_list_reads", "pool list reads from etcd",
                                          value=daemon.pools.reads)
                txns = CounterMetricFamily(
                    "coild_etcd_group_commits", "etcd transactions of the address-write group "
                    "commits (assign: ADD's records, release: DEL's)", labels=["kind"])
                items = CounterMetricFamily(
                    "coild_etcd_group_commit_records", "address records those transactions "
                    "carried (records / commits: the mean batch)", labels=["kind"])
                for kind, group in daemon.allocator.group_commits().items():
                    txns.add_metric([kind], group.batches)
                    items.add_metric([kind], group.items)
                yield txns
                yield items
                etcd = getattr(daemon.store, "etcd", None)
                if etcd is not None:
                    in_use = GaugeMetricFamily("coild_etcd_member_in_use",
                                               "1 for the etcd member the next call starts with",
                                               labels=["endpoint"])
                    in_use.add_metric([etcd.member_in_use], 1)
                    yield in_use
        self.registry.register(_Etcd())

    def observe_cni(self, command: str, code: int, seconds: float):
        self.cni_requests.labels(command, "ok" if code == 0 else "error").inc()
        self.cni_seconds.labels(command).observe(seconds)

    def render(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
