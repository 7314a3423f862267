"""ember.sim: a discrete-event fleet simulator driving ember.policy with a fake clock.

Readers for spot traces (`spot_trace`), workloads (`workload`) and latency profiles
(`profile_file`); the single-deployment spot simulator (`core`, `fleet`, `switch`); the
serverless multi-model simulator (`serverless`); comparison, reporting and plots (`runner`,
`metrics`, `plots`). No Ray, no torch. See docs/sim.md.
"""
