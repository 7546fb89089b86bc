"""Fact correction: change a few facts with LoRA, and measure efficacy and locality.

Efficacy: do the edited prompts now give the new answer ("the cat sits on the" -> sofa, not table)?
Locality: do related facts that were not edited keep their answer? finetune.py --task fact-correction
trains LoRA on v_proj only and on q, k, v, o and prints `edit_table` of both.
"""

from dataclasses import dataclass

from minigpt.predict import probability_of, top_next_words


@dataclass
class EditReport:
    """Efficacy and locality of one fact-correction run."""

    variant: str
    trainable_params: int
    edited: list  # (prompt, new_answer, p_new before, p_new after, top-1 after)
    locality: list  # (prompt, answer, top-1 before, top-1 after)

    @property
    def efficacy(self) -> float:
        """Fraction of edited facts whose top-1 is now the new answer."""
        return sum(top == new for _, new, _, _, top in self.edited) / len(self.edited)

    @property
    def locality_kept(self) -> float:
        """Fraction of related, unedited facts whose top-1 did not change."""
        return sum(before == after for _, _, before, after in self.locality) / len(self.locality)


def edit_report(variant: str, trainable_params: int, base_model, edited_model, tokenizer, edit_set) -> EditReport:
    """Measure an edit: p(new answer) before/after for edited probes, top-1 before/after for locality probes."""
    edited = []
    for probe in edit_set.edited_probes:
        before = probability_of(base_model, tokenizer, probe.prompt, probe.new_answer)
        after = probability_of(edited_model, tokenizer, probe.prompt, probe.new_answer)
        top = top_next_words(edited_model, tokenizer, probe.prompt, k=1)[0][0]
        edited.append((probe.prompt, probe.new_answer, before, after, top))
    locality = []
    for probe in edit_set.locality_probes:
        before = top_next_words(base_model, tokenizer, probe.prompt, k=1)[0][0]
        after = top_next_words(edited_model, tokenizer, probe.prompt, k=1)[0][0]
        locality.append((probe.prompt, probe.answer, before, after))
    return EditReport(variant, trainable_params, edited, locality)


def edit_table(reports: list[EditReport]) -> str:
    """Efficacy per edited fact and locality per related fact, one column per variant."""
    lines = [f"{'edited fact':<34}{'new':>8}{'p before':>10}" + "".join(f"{r.variant:>24}" for r in reports)]
    for index, (prompt, new, before, _, _) in enumerate(reports[0].edited):
        cells = "".join(f"{f'{r.edited[index][3]:.0%} (top: {r.edited[index][4]})':>24}" for r in reports)
        lines.append(f"{prompt:<34}{new:>8}{before:>10.0%}{cells}")
    lines.append("")
    lines.append(f"{'locality fact':<34}{'answer':>8}{'base':>10}" + "".join(f"{r.variant:>24}" for r in reports))
    for index, (prompt, answer, before, _) in enumerate(reports[0].locality):
        cells = "".join(f"{r.locality[index][3]:>24}" for r in reports)
        lines.append(f"{prompt:<34}{answer:>8}{before:>10}{cells}")
    lines.append("")
    for report in reports:
        lines.append(f"{report.variant}: efficacy {report.efficacy:.0%}, locality kept {report.locality_kept:.0%}, "
                     f"{report.trainable_params:,} trainable parameters")
    return "\n".join(lines)
