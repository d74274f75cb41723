from lorambo.optimizers.low_rank import AdaRankGrad, GaLore  # noqa: F401
