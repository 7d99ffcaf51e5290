"""medtune: turn a small open chat model into a local medical reasoning model."""

__version__ = "0.1.0"

DISCLAIMER = (
    "medtune and the models it produces are research and education software. They are not a medical device, "
    "must not be used for diagnosis or treatment, and can be confidently wrong. Consult a qualified clinician."
)
