"""``hhrlhf online``: the iterated online loop of the HH-RLHF paper (deploy the policy, collect
comparisons, retrain the PM, retrain the policy, again), with simulated annotators."""
