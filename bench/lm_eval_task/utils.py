"""Map the local MedQA JSONL (question, options {A..D}, answer_idx) onto lm-eval's medqa_4options fields, and the
cloze task's prompt, choices and target over the same records."""

from lm_eval.tasks.medqa.preprocess_medqa import doc_to_target, doc_to_text

__all__ = ["cloze_choices", "cloze_target", "cloze_text", "doc_to_target", "doc_to_text", "process_docs"]


def process_docs(dataset):
    def to_hub_shape(doc: dict) -> dict:
        options = doc["options"]
        return {"sent1": doc["question"], "ending0": options["A"], "ending1": options["B"],
                "ending2": options["C"], "ending3": options["D"], "label": "ABCD".index(doc["answer_idx"])}

    return dataset.map(to_hub_shape)


def cloze_text(doc: dict) -> str:
    # medtune reads the question stripped of surrounding whitespace; the same here, so both prompts are equal
    return f"Question: {doc['question'].strip()}\nAnswer:"


def cloze_choices(doc: dict) -> list[str]:
    return [doc["options"][letter] for letter in "ABCD"]


def cloze_target(doc: dict) -> int:
    return "ABCD".index(doc["answer_idx"])
