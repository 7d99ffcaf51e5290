"""The evaluation stage: multiple-choice medical benchmarks, answer extraction, accuracy with intervals."""
