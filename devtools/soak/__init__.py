"""`make soak`: the local cluster under load and random faults, and a checker that proves
nothing was lost, repeated or reordered (docs/soak.md)."""
