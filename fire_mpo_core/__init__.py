"""FiRe-MPO core library: data contracts, datasets, models, engines, judges, corruption, losses,
training, metrics and the artifact store. Free of Prefect: orchestration lives in `tasks/` and
`flows/`, which import this package, never the other way round."""

__version__ = "0.1.0"
