"""Preference tuning (``--method dpo``): the losses on sequence log-probabilities
(:mod:`.losses`), the reference model (:mod:`.reference`) and the Trainer that sums the losses
over the pairs of an accumulated batch and logs the figures (:mod:`.trainer`). docs/PREFERENCE.md.
"""
