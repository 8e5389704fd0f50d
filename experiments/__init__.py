"""Scripts run from a clone: `python -m experiments.train` (= `manualbp-train`), `experiments.train_digits`
(the demo), `experiments.digits_report`, the second-order, memory and forward-vs-reverse studies."""
