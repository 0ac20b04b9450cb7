"""Solutions to the exercises of lessons/12_distillation_and_the_r1_pipeline.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, format_reward, parse_answer, ...).
tests/test_lessons.py runs the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: consistency_filter
def my_consistency(text, operands):
    """text: a response ("<think>…</think><answer>…</answer><eos>"); operands: (a, b). Returns 1.0 or 0.0."""
    if format_reward(text) != 1.0:
        return 0.0
    body = text.split("<eos>", 1)[0]
    think = body[len("<think>"):body.index("</think>")]
    a, b = (str(x)[::-1] for x in operands)  # digits, units first
    width = max(len(a), len(b))
    a, b = a.ljust(width, "0"), b.ljust(width, "0")
    steps = think.split(" ")
    if len(steps) != width:
        return 0.0
    carry, digits = 0, []
    for step, x, y in zip(steps, a, b):
        expected = f"{x}+{y}{'+1' if carry else ''}={int(x) + int(y) + carry}"  # the one right way to write it
        if step != expected:
            return 0.0
        total = int(x) + int(y) + carry
        carry = int(total >= 10)
        digits.append(total)
    from_steps = str(digits[-1]) + "".join(str(total % 10) for total in reversed(digits[:-1]))
    return 1.0 if parse_answer(text).strip(" ") == from_steps else 0.0


# %% exercise: find_the_exploit
def exploit(problem):
    """A response to `problem` that first_number_judge accepts and the strict accuracy rule rejects."""
    return f"<think>{problem.reference}</think><answer>0</answer><eos>"  # the first number is in the think block
