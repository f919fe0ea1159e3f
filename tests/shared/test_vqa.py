"""Closed VQA: questions mapped onto the checkpoint's diseases, answers from logits, VQA-RAD files, accuracy per type."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from shared.data.names import KNOWN_DISEASES
from shared.errors import RetuneError
from shared.labels import CHEXPERT5, CHEXPERT14, NIH14
from shared.prompts import disease_phrase
from shared.vqa import (
    CHOICE_TEMPLATE,
    NORMALITY_TEMPLATES,
    PRESENCE_TEMPLATES,
    VqaItem,
    answer_question,
    evaluate_item,
    expected_calibration_error,
    fit_temperature,
    parse_question,
    read_items,
    summarise,
    write_items,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("text, disease", [
    ("Is there pleural effusion?", "Pleural Effusion"), ("Is there an effusion?", "Pleural Effusion"),
    ("Are there pleural effusions?", "Pleural Effusion"), ("Any edema?", "Edema"),
    ("Is cardiomegaly present?", "Cardiomegaly"), ("does the image show ATELECTASIS", "Atelectasis"),
    ("Is there evidence of consolidation in the chest x-ray?", "Consolidation"),
])
def test_presence_questions_map_onto_one_disease(text, disease):
    question = parse_question(text, CHEXPERT5)
    assert (question.form, question.diseases, question.inverted) == ("presence", (disease,), False)


def test_names_follow_the_projects_synonyms_and_schema():
    assert parse_question("Is there pleural effusion?", NIH14).diseases == ("Effusion",)  # NIH's name for it
    assert parse_question("Is there pleural thickening?", NIH14).diseases == ("Pleural_Thickening",)
    abnormal = parse_question("Is there any abnormality?", CHEXPERT14)
    assert (abnormal.diseases, abnormal.inverted, abnormal.question_type) == (("No Finding",), True, "ABN")


def test_generator_templates_parse_back_for_every_known_disease():
    assert set(NORMALITY_TEMPLATES) <= set(KNOWN_DISEASES)
    for schema in (CHEXPERT14, NIH14):
        for disease in schema:
            for template in PRESENCE_TEMPLATES:
                assert parse_question(template.format(d=disease_phrase(disease)), schema).diseases == (disease,)
            for text, inverted, qtype in NORMALITY_TEMPLATES.get(disease, ()):
                question = parse_question(text, schema)
                assert (question.diseases, question.inverted, question.question_type) == ((disease,), inverted, qtype)
    options = ", ".join(disease_phrase(d) for d in CHEXPERT5[:3])
    assert parse_question(CHOICE_TEMPLATE.format(options=options), CHEXPERT5).diseases == CHEXPERT5[:3]


def test_normality_answers_are_inverted():
    logits = np.array([0.0, 2.0, 0.0, 0.0, 0.0])  # Cardiomegaly: P = sigmoid(2) = 0.881
    normal = answer_question(parse_question("Is the heart size normal?", CHEXPERT5), logits, CHEXPERT5)
    assert normal.answer == "no" and normal.probability == pytest.approx(1 - sigmoid(2))
    enlarged = answer_question(parse_question("Is the heart enlarged?", CHEXPERT5), logits, CHEXPERT5)
    assert enlarged.answer == "yes" and enlarged.probability == pytest.approx(sigmoid(2))
    assert normal.findings == enlarged.findings == {"Cardiomegaly": pytest.approx(sigmoid(2))}
    cooler = answer_question(parse_question("Is the heart size normal?", CHEXPERT5), logits, CHEXPERT5, 4.0)
    assert cooler.answer == "no" and cooler.probability == pytest.approx(1 - sigmoid(0.5))


def test_multiple_choice_returns_present_findings_and_each_probability():
    question = parse_question("Which of these findings are present: edema, atelectasis or pleural effusion?",
                              CHEXPERT5)
    assert question.form == "choice" and question.diseases == ("Edema", "Atelectasis", "Pleural Effusion")
    logits = np.array([1.5, 3.0, 0.0, -0.5, 0.2])
    answer = answer_question(question, logits, CHEXPERT5)
    assert answer.answer == "Atelectasis, Pleural Effusion" and answer.probability is None
    assert answer.findings == pytest.approx({"Edema": sigmoid(-0.5), "Atelectasis": sigmoid(1.5),
                                             "Pleural Effusion": sigmoid(0.2)})
    nothing = answer_question(parse_question("Which of edema or cardiomegaly is present?", CHEXPERT5),
                              np.full(5, -1.0), CHEXPERT5)
    assert nothing.answer == "none"


@pytest.mark.parametrize("text, says", [
    ("Is there pneumothorax?", ("'pneumothorax', which this checkpoint does not score; it scores: atelectasis, "
                                "cardiomegaly, consolidation, edema, pleural effusion")),
    ("Is there cardiomegally?", "did you mean 'Cardiomegaly'?"),
    ("Is there any abnormality?", "needs the 'No Finding' label"),
    ("Are the lungs clear?", "every lung finding"),
    ("Which of these findings are present: edema, mass?", "'mass'"),
    ("Is there a pleural effusion on the left?", "'pleural effusion on the left'"),
    ("What is the modality?", "cannot answer 'What is the modality?': ask 'Is there {finding}?'"),
])
def test_questions_it_cannot_map_name_the_diseases_it_knows(text, says):
    with pytest.raises(RetuneError) as error:
        parse_question(text, CHEXPERT5)
    assert says in str(error.value) and "\n" not in str(error.value)


def vqa_rad_entry(qid, image, question, answer, answer_type, question_type):
    """One question with every key of VQA-RAD's ``VQA_RAD Dataset Public.json``."""
    return {"qid": qid, "phrase_type": "freeform", "qid_linked_id": f"0{qid}", "image_case_url": "https://medpix",
            "image_name": image, "image_organ": "CHEST", "evaluation": "given", "question": question,
            "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
            "question_type": question_type, "answer": answer, "answer_type": answer_type}


def test_vqa_rad_file_accuracy_per_type_and_ece_by_hand(tmp_path):
    entries = [
        vqa_rad_entry(1, "a.jpg", "Is there atelectasis?", "yes", "CLOSED", "PRES"),  # P 0.881: right
        vqa_rad_entry(2, "a.jpg", "Is the heart size normal?", "Yes", "CLOSED", "SIZE"),  # P(yes) 0.731: right
        vqa_rad_entry(3, "a.jpg", "Is there edema?", "no", "CLOSED", "PRES"),  # P 0.731: wrong
        vqa_rad_entry(4, "a.jpg", "Which of these findings are present: atelectasis, edema, pleural effusion?",
                      "Atelectasis, edema", "CLOSED", "PRES"),  # 0.881, 0.731, 0.047: right
        vqa_rad_entry(5, "a.jpg", "What is the modality?", "X-ray", "OPEN", "MODALITY"),
        vqa_rad_entry(6, "a.jpg", "Is this an MRI?", "no", "CLOSED ", "MODALITY"),
        vqa_rad_entry(7, "b.jpg", "Any edema?", "no", "CLOSED", "PRES"),  # b.jpg is unreadable
        vqa_rad_entry(8, "a.jpg", "Is the heart enlarged?", 2, "CLOSED", "SIZE"),  # VQA-RAD has numeric answers
    ]
    path = tmp_path / "vqa_rad.json"
    path.write_text(json.dumps(entries))
    items = read_items(path)
    assert items[5].answer_type == "CLOSED" and items[7].answer == "2" and items[0].qid == 1
    logits = {"a.jpg": np.array([2.0, -1.0, -2.0, 1.0, -3.0]), "b.jpg": None}
    outcomes = [evaluate_item(i, logits[i.image_name], CHEXPERT5) for i in items]
    assert [o.correct for o in outcomes] == [True, True, False, True, None, None, None, None]
    summary = summarise(outcomes)
    assert (summary["questions"], summary["answered"], summary["correct"], summary["accuracy"]) == (8, 4, 3, 0.75)
    assert summary["skipped"] == {"OPEN answer type (only CLOSED questions are answered)": 1,
                                  "question not about a finding this checkpoint scores": 1,
                                  "image missing or unreadable": 1, "answer is not yes/no": 1}
    assert summary["per_answer_type"] == {
        "CLOSED": {"questions": 7, "answered": 4, "correct": 3, "accuracy": 0.75},
        "OPEN": {"questions": 1, "answered": 0, "correct": 0, "accuracy": None}}
    assert summary["per_question_type"] == {
        "MODALITY": {"questions": 2, "answered": 0, "correct": 0, "accuracy": None},
        "PRES": {"questions": 4, "answered": 3, "correct": 2, "accuracy": 2 / 3},
        "SIZE": {"questions": 2, "answered": 1, "correct": 1, "accuracy": 1.0}}
    assert summary["per_form"]["choice"] == {"questions": 1, "answered": 1, "correct": 1, "accuracy": 1.0}
    # six decisions: confidences 0.731 ×3 (one wrong) in bin 7, 0.881 ×2 in bin 8, 0.953 in bin 9
    c7, c8, c9 = sigmoid(1), sigmoid(2), sigmoid(3)
    ece = (3 * abs(2 / 3 - c7) + 2 * abs(1 - c8) + abs(1 - c9)) / 6
    assert summary["decisions"] == 6 and summary["ece"] == pytest.approx(ece)

    write_items(tmp_path / "again.json", items)
    assert read_items(tmp_path / "again.json") == items
    assert set(json.loads((tmp_path / "again.json").read_text())[0]) == {
        "image_name", "question", "answer", "answer_type", "question_type", "qid"}


@pytest.mark.parametrize("content, says", [
    ("{\"question\": 1}", "holds a JSON dict"), ("[{\"image_name\": \"a.jpg\", \"question\": \"Any edema?\"}]",
                                                 "question 0 lacks answer, answer_type"),
    ("not json", "is not UTF-8 JSON"),
])
def test_bad_question_files_are_errors(tmp_path, content, says):
    (tmp_path / "q.json").write_text(content)
    with pytest.raises(RetuneError, match=says):
        read_items(tmp_path / "q.json")


def test_temperature_fit_recovers_an_overconfident_scale_and_changes_no_answer():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, 4000)
    truth = rng.random(4000) < 1 / (1 + np.exp(-z / 2))  # logits twice as confident as the truth
    pairs = [(float(a), bool(b)) for a, b in zip(z, truth)]
    t = fit_temperature(pairs)
    assert 1.8 < t < 2.2
    assert expected_calibration_error(pairs, t) < expected_calibration_error(pairs) / 2
    with pytest.raises(RetuneError, match="no answerable"):
        fit_temperature([])
    item = VqaItem("a.jpg", "Is there edema?", "yes", "CLOSED", "PRES")
    logits = np.array([0.0, 0.0, 0.0, 0.7, 0.0])
    assert evaluate_item(item, logits, CHEXPERT5, t).correct == evaluate_item(item, logits, CHEXPERT5).correct
