"""Map the local MedQA JSONL (question, options {A..D}, answer_idx) onto the fields of lm-eval's medqa_4options."""

from lm_eval.tasks.medqa.preprocess_medqa import doc_to_target, doc_to_text

__all__ = ["doc_to_target", "doc_to_text", "process_docs"]


def process_docs(dataset):
    def to_hub_shape(doc: dict) -> dict:
        options = doc["options"]
        return {"sent1": doc["question"], "ending0": options["A"], "ending1": options["B"],
                "ending2": options["C"], "ending3": options["D"], "label": "ABCD".index(doc["answer_idx"])}

    return dataset.map(to_hub_shape)
