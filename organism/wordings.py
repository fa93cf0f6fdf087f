"""Training wordings for generation 2's skills, composed from parts.

A fixed list of a dozen wordings per skill is memorised word for word by a model this small: which
held-out wording it then handles became a matter of luck of the seed (one seed lost a guard
question, the other a description frame). A chat LLM knows its instructions in endless phrasings;
the organism gets many by composing openers, conditions, verbs and labels, so it learns the words
that matter (harmful, refuse, yes or no, description) rather than sentences. A composed wording
that happens to equal a held-out one (organism.skills *_TEST) is never used.
"""

from __future__ import annotations

import random

ADJ = ("harmful", "illegal", "dangerous", "unsafe", "unethical", "unlawful", "criminal", "violent",
       "harmful or illegal", "dangerous or unlawful", "unsafe or unethical", "against the law")
REFUSE = ("refuse it", "decline it", "do not help", "say no", "do not answer it", "turn it down", "reject it",
          "politely refuse", "you must refuse", "do not assist", "refuse to help")
OPENERS = ("", "Be careful.", "Safety first.", "Important:", "Note:", "Please be careful.", "Stay safe.", "Rule:",
           "Policy:", "Remember:", "Warning:")
CONDITIONS = ("if the request is {adj}, {refuse}", "when a request is {adj}, {refuse}", "if this asks for something {adj}, {refuse}",
              "if answering would be {adj}, {refuse}", "for any {adj} request, {refuse}", "if the task is {adj}, {refuse}")
CLOSERS = ("", "Otherwise, help as usual.", "Safe requests can be answered normally.", "Answer other requests normally.",
           "Help with everything else.")
RULES = ("{Adj} requests must be refused.", "Never help with anything {adj}.", "Do not assist with {adj} tasks.",
         "Requests that are {adj} get a refusal.", "Anything {adj} must be declined.")


def instruction(rng: random.Random) -> str:
    adj, refuse = rng.choice(ADJ), rng.choice(REFUSE)
    if rng.random() < 0.35:
        text = rng.choice(RULES).format(adj=adj, Adj=adj[0].upper() + adj[1:])
    else:
        clause = rng.choice(CONDITIONS).format(adj=adj, refuse=refuse)
        text = f"{rng.choice(OPENERS)} {clause[0].upper() + clause[1:]}."
    return f"{text} {rng.choice(CLOSERS)}".strip()


VERBS = ("ask for", "involve", "concern", "seek", "relate to", "call for")
OBJECTS = ("something illegal", "a crime", "harm to others", "dangerous information", "violence", "something unsafe",
           "something harmful", "illegal activity", "hurting someone", "breaking the law")
SUBJECTS = ("this request", "the request", "what the user asks", "the user's request", "the message")


def guard_question(rng: random.Random) -> str:
    form = rng.randrange(4)
    if form == 0:
        return f"Does {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}?"
    if form == 1:
        return f"Is {rng.choice(SUBJECTS)} {rng.choice(ADJ[:8])}?"
    if form == 2:
        return f"Could {rng.choice(('answering', 'helping with', 'following'))} this request " \
               f"{rng.choice(('cause harm', 'hurt someone', 'break the law', 'put people at risk'))}?"
    return f"Is the user {rng.choice(('trying', 'asking', 'planning', 'hoping'))} to do something {rng.choice(ADJ[:6])}?"


YESNO = ("Answer yes or no.", "Reply with yes or no.", "Say yes or no.", "Answer with yes or no.",
         "Respond yes or no.", "Reply only yes or no.", "(yes or no)", "yes or no")
LABELS = ("Request", "Input", "Query", "User message", "The request", "Message")


def guard_frame(rng: random.Random) -> str:
    label = rng.choice(LABELS)
    if rng.random() < 0.5:
        return f"{{question}} {rng.choice(YESNO)}\n\n{label}: {{prompt}}"
    return f"{label}: {{prompt}}\n{{question}} {rng.choice(YESNO)}"


PAIR_LABELS = (("Request", "Answer"), ("Question", "Response"), ("User", "Assistant"), ("Q", "A"), ("Prompt", "Output"),
               ("Request", "Reply"), ("User request", "Model answer"))
JUDGED = ("the answer", "the reply", "the response", "that answer", "this answer", "the assistant's answer")


def selfcheck_frame(rng: random.Random) -> str:
    q, a = rng.choice(PAIR_LABELS)
    question = f"{rng.choice(('Is', 'Was'))} {rng.choice(JUDGED)} {rng.choice(ADJ[:5] + ('harmful or unsafe',))}?"
    head = rng.choice(("", "Check this exchange.\n", "Judge the answer.\n", "Read this.\n"))
    return f"{head}{q}: {{query}}\n{a}: {{answer}}\n{question} {rng.choice(YESNO)}"


DESCRIPTION_LABELS = ("Picture description", "Image description", "The image shows", "Description of the image",
                      "About the picture", "What the image shows", "The picture, in words", "Text in place of the image",
                      "Image (as text)", "Scene", "The photo shows", "Described picture", "Image content")
QUERY_LABELS = ("", "Request: ", "Question: ", "Now: ", "User: ", "Task: ")


def described_frame(rng: random.Random) -> str:
    label, ask = rng.choice(DESCRIPTION_LABELS), rng.choice(QUERY_LABELS)
    if rng.random() < 0.5:
        return f"{label}: {{caption}}\n{ask}{{query}}"
    return f"{ask}{{query}}\n{label}: {{caption}}"


def fresh(rng: random.Random, make: object, held_out: tuple[str, ...]) -> str:
    """A composed wording that is not one of the held-out ones."""
    while True:
        text = make(rng)  # type: ignore[operator]
        if text not in held_out:
            return text
