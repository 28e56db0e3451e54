"""Speculative decoding: a decoding request feeds tokens proposed ahead beside its own last one, one forward scores
them all, and the tokens the model would have produced anyway are kept, so a step can yield several tokens and the
output is the same as without speculation (greedy: token for token; sampling: the same distribution).

- `ngram`: the proposer, prompt lookup over the request's own tokens;
- `verify`: the acceptance rule, greedy and by rejection sampling;
- `speculator`: which requests propose this step, from their acceptance so far and the step's measured cost, and the
  counts behind the metrics.
"""
