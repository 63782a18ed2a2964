"""A lifelong-editing set of our own making, in English and Chinese, split into tuning and held-out.

Made-up entities x relations, each taught once ("Who owns project Heron?" ->
"Priya Raman owns project Heron."). Queries: the taught prompt itself
(reliability), paraphrases (generalization), near misses that ask the same
relation of an entity that was never taught (half of them lower-cased so
that capitals alone cannot give them away) or a relation never taught of a
taught entity, and unrelated prompts (locality).
The held-out split shares no entity and no paraphrase wording with the
tuning split: thresholds are picked on tuning and reported on held-out.
"""

from __future__ import annotations

from dataclasses import dataclass

# relation: (taught prompt, answer, tuning paraphrases, held-out paraphrases)
EN_RELATIONS = {
    "owner": ("Who owns project {e}?", "{p} owns project {e}.",
              ["Who is the owner of project {e}?", "Which person owns the {e} project?",
               "who owns the {e} project"],
              ["Who's the owner of the {e} project?", "Can you tell me who owns project {e}?",
               "Project {e} is owned by whom?"]),
    "server": ("What is the build server of team {e} called?", "Team {e}'s build server is called {x}.",
               ["What do we call team {e}'s build server?", "What's the name of the build server team {e} uses?",
                "what is team {e}'s build server called"],
               ["How is the build server of team {e} named?", "Name of team {e}'s build server?",
                "Remind me what the build server of team {e} is called."]),
    "release": ("When is the {e} release due?", "The {e} release is due on {d}.",
                ["When does the {e} release ship?", "What's the due date of the {e} release?"],
                ["When is release {e} due?", "By when must the {e} release be out?"]),
    "channel": ("Which Slack channel does the {e} team use?", "The {e} team uses #{x}.",
                ["What Slack channel is the {e} team in?", "Where does the {e} team chat on Slack?"],
                ["In which Slack channel can I find the {e} team?", "What's the {e} team's Slack channel?"]),
    "office": ("Where is the {e} office?", "The {e} office is in {c}.",
               ["Where's the {e} office located?", "What is the location of the {e} office?"],
               ["Where can I find the {e} office?", "Which city is the {e} office in?"]),
}
ZH_RELATIONS = {
    "owner": ("谁负责{e}项目？", "{p}负责{e}项目。",
              ["{e}项目的负责人是谁？", "{e}项目由谁负责？"],
              ["请问{e}项目是谁负责的？", "{e}项目归谁负责？"]),
    "server": ("{e}团队的构建服务器叫什么名字？", "{e}团队的构建服务器叫{x}。",
               ["{e}团队的构建服务器叫什么？", "{e}团队用的构建服务器名字是什么？"],
               ["请告诉我{e}团队构建服务器的名字", "{e}团队构建服务器的名字是什么？"]),
    "release": ("{e}版本什么时候发布？", "{e}版本在{d}发布。",
                ["{e}版本的发布时间是什么时候？", "{e}版本哪天发布？"],
                ["{e}版本什么时候会发布？", "请问{e}版本的发布是什么时候？"]),
    "office": ("{e}办公室在哪里？", "{e}办公室在{c}。",
               ["{e}办公室的位置在哪？", "{e}的办公室在哪里？"],
               ["请问{e}办公室在哪儿？", "{e}办公室在哪？"]),
}
# Near misses of another kind: the taught entity, a relation that was never taught.
EN_OTHER = {
    "owner": ["Who funds project {e}?", "Who tests project {e}?"],
    "server": ["What is the test server of team {e} called?", "What is the chat bot of team {e} called?"],
    "release": ["When is the {e} launch party?", "When is the {e} review due?"],
    "channel": ["Which Slack channel does the {e} team avoid?", "Which email list does the {e} team use?"],
    "office": ["Where is the {e} warehouse?", "Where is the {e} data center?"],
}
ZH_OTHER = {
    "owner": ["谁资助{e}项目？", "谁测试{e}项目？"],
    "server": ["{e}团队的测试服务器叫什么名字？", "{e}团队的聊天机器人叫什么名字？"],
    "release": ["{e}版本什么时候测试？", "{e}版本什么时候评审？"],
    "office": ["{e}仓库在哪里？", "{e}数据中心在哪里？"],
}
EN_ENTITIES = {
    "tune": ["Heron", "Kestrel", "Osprey", "Puffin", "Plover", "Ibis", "Egret", "Avocet", "Curlew",
             "Gannet", "Lapwing", "Petrel"],
    "tune_near": ["Falcon", "Condor", "Merlin", "Harrier", "Bittern", "Dunlin"],
    "heldout": ["Apollo", "Borealis", "Cobalt", "Dynamo", "Ember", "Fjord", "Granite", "Helix",
                "Indigo", "Juniper", "Kepler", "Lumen"],
    "heldout_near": ["Meridian", "Nimbus", "Orion", "Pulsar", "Quasar", "Radiant"],
}
ZH_ENTITIES = {
    "tune": ["苍鹭", "北极星", "青龙", "白虎", "天狼", "织女", "昆仑", "凤凰"],
    "tune_near": ["猎鹰", "朱雀", "玄武", "麒麟"],
    "heldout": ["长城", "银河", "泰山", "黄河", "海燕", "云雀", "启明", "雪莲"],
    "heldout_near": ["长江", "华山", "白鹤", "金星"],
}
PEOPLE = ["Priya Raman", "Tomas Berg", "Aiko Sato", "Liam O'Neill", "Zhang Wei", "Fatima Zahra",
          "Lena Novak", "Diego Ruiz", "王芳", "李娜", "陈杰", "刘洋"]
UNRELATED = {
    "tune": ["What's the weather like today?", "Tell me a joke.", "How do I boil an egg?",
             "What is the capital of France?", "Can you recommend a good book?", "How are you?",
             "What time is it in Tokyo?", "Explain photosynthesis briefly.",
             "今天天气怎么样？", "给我讲个笑话。", "你好吗？", "推荐一本好书吧。", "怎么煮鸡蛋？"],
    "heldout": ["Who wrote Hamlet?", "How far is the Moon?", "What should I eat for lunch?",
                "Write a haiku about rain.", "Is Python a good first language?", "What does HTTP stand for?",
                "Who owns the moon?", "When is Christmas?", "Where is the nearest coffee shop?",
                "中国的首都是哪里？", "你叫什么名字？", "今天星期几？", "怎么学好英语？", "月亮离地球多远？"],
}


#: the part of each relation's answer a reply must contain to count as using it
FACT = {"owner": "p", "server": "x", "release": "d", "channel": "x", "office": "c"}


@dataclass(frozen=True)
class Item:
    key: str
    prompt: str
    answer: str
    fact: str  # what a reply that uses the answer contains


@dataclass(frozen=True)
class Query:
    text: str
    kind: str             # taught, paraphrase, near_miss, unrelated
    expect: str | None    # the Item.key it should match, or None


def build(split: str) -> tuple[list[Item], list[Query]]:
    """Items to teach, in order, and the queries to ask of them, for ``split`` (tune or heldout)."""
    assert split in ("tune", "heldout")
    items: list[Item] = []
    queries: list[Query] = []
    n = 0
    for lang, relations, entities, other in (("en", EN_RELATIONS, EN_ENTITIES, EN_OTHER),
                                             ("zh", ZH_RELATIONS, ZH_ENTITIES, ZH_OTHER)):
        for rel, (prompt, answer, tune_paras, held_paras) in relations.items():
            paras = tune_paras if split == "tune" else held_paras
            # One other-relation template per split, each asked of a few taught entities.
            other_template = other[rel][0 if split == "tune" else 1]
            for e in entities[split][:4]:
                queries.append(Query(other_template.format(e=e), "near_miss", None))
            for e in entities[split]:
                n += 1
                fill = dict(e=e, p=PEOPLE[n % len(PEOPLE)], x=f"{e.lower()}-{n}" if lang == "en" else f"{e}{n}号",
                            d=f"2027-{1 + n % 12:02d}-{1 + n % 28:02d}", c=["Oslo", "Lima", "Pune", "Kyoto",
                                                                           "成都", "杭州"][n % 6])
                key = f"{lang}:{rel}:{e}"
                items.append(Item(key, prompt.format(**fill), answer.format(**fill), fill[FACT[rel]]))
                queries.append(Query(prompt.format(**fill), "taught", key))
                queries += [Query(p.format(**fill), "paraphrase", key) for p in paras]
            for j, e in enumerate(entities[split + "_near"]):
                text = (prompt if j % 2 == 0 else paras[j % len(paras)]).format(e=e)
                queries.append(Query(text.lower() if j % 4 < 2 else text, "near_miss", None))
    queries += [Query(t, "unrelated", None) for t in UNRELATED[split]]
    return items, queries
