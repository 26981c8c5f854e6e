"""The closed loop over rounds: which policy is each round's reference (`config.reference`),
whether another round is worth running (`decide`), and which round's adapter is the best
(`promote`, `card`). Above `evaluation` (it ranks rounds by evaluate's metrics), below `config`
(which aggregates `LoopConfig` as the `loop:` section)."""
