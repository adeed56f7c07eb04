"""The pairwise LLM judge end to end: the real ``openai`` client against a scripted OpenAI-compatible
judge on loopback (fair, position-biased, unparseable, faulty), the cache, SIGKILL, max_cost."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alpaca_lora.endpoint.scripted import Canned, Fault, ScriptedOpenAI
from alpaca_lora.evaluate.__main__ import main
from alpaca_lora.evaluate.judge import SYSTEM_PROMPT, combine

ROOT = Path(__file__).resolve().parents[2]


def write_answers(path: Path, generator: str, outputs: list[str], category: str = "writing") -> Path:
    path.write_text("".join(json.dumps({"id": str(i), "instruction": f"Task number {i}: do the thing.",
                                        "input": "some input" if i % 2 else "", "output": output,
                                        "generator": generator, "category": category if i < 4 else "math"}) + "\n"
                            for i, output in enumerate(outputs)))
    return path


@pytest.fixture
def answers(tmp_path):
    """A is better on items 0-3, B on item 4, items 5-6 are equally good."""
    a = write_answers(tmp_path / "a.jsonl", "model-a", ["GOOD 0", "GOOD 1", "GOOD 2", "GOOD 3", "BAD 4", "GOOD 5",
                                                         "GOOD 6"])
    b = write_answers(tmp_path / "b.jsonl", "model-b", ["BAD 0", "BAD 1", "BAD 2", "BAD 3", "GOOD 4", "GOOD 5b",
                                                         "GOOD 6b"])
    return a, b


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-judge-secret")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def shown(body: dict) -> tuple[str, str]:
    """The responses shown as A and as B in a judge request."""
    user = body["messages"][-1]["content"]
    first = re.search(r"Assistant A's Response\]\n(.*)\n\[The End of Assistant A", user, re.S).group(1)
    second = re.search(r"Assistant B's Response\]\n(.*)\n\[The End of Assistant B", user, re.S).group(1)
    return first, second


def fair(body: dict) -> Canned:
    first, second = shown(body)
    good_first, good_second = first.startswith("GOOD"), second.startswith("GOOD")
    verdict = "C" if good_first == good_second else ("A" if good_first else "B")
    return Canned(f"Comparing the two responses carefully. Verdict: [[{verdict}]]")


def judge(server, answers, out, *overrides):
    a, b = answers
    return main(["judge", f"a={a}", f"b={b}", "judge_model=gpt-4o-mini", f"base_url={server.base_url}",
                 f"output_dir={out}", "concurrency=3", *overrides])


def read_outputs(out: Path):
    report = json.loads((out / "report.json").read_text())
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    return report, judgments


def test_a_fair_judge_both_orders_report_table_and_chart(answers, tmp_path, capsys):
    with ScriptedOpenAI(default=fair) as server:
        assert judge(server, answers, tmp_path / "out") == 0
    report, judgments = read_outputs(tmp_path / "out")
    assert len(server.received) == 14  # 7 pairs, two orders each
    for request in server.received:
        body = request["body"]
        assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert body["temperature"] == 0.0 and body["max_tokens"] == 2048 and body["model"] == "gpt-4o-mini"
    # each pair was shown once each way round
    orders = {}
    for request in server.received:
        orders.setdefault(frozenset(shown(request["body"])), []).append(shown(request["body"]))
    assert all(len(seen) == 2 and seen[0] == seen[1][::-1] for seen in orders.values())
    assert {k: report[k] for k in ("a", "b", "wins_a", "wins_b", "ties")} == \
        {"a": "model-a", "b": "model-b", "wins_a": 4, "wins_b": 1, "ties": 2}
    assert report["summary"] == "model-a wins 4 vs model-b 1, 2 ties"
    assert report["win_rate_a"] == pytest.approx(5 / 7, abs=1e-4)
    low, high = report["ci95"]
    assert 0 <= low < report["win_rate_a"] < high <= 1
    assert report["position_bias"]["rate"] == 0.0 and report["complete"]
    assert report["per_category"]["writing"]["wins_a"] == 4 and report["per_category"]["math"]["ties"] == 2
    assert report["usage"]["requests"] == 14 and report["usage"]["prompt_tokens"] == server.usage["prompt_tokens"]
    expected_cost = (server.usage["prompt_tokens"] * 0.15 + server.usage["completion_tokens"] * 0.60) / 1e6
    assert report["usage"]["cost_usd"] == pytest.approx(expected_cost, abs=1e-4)
    assert len(judgments) == 7 and judgments[0]["verdicts"] == ["A", "B"] and judgments[0]["winner"] == "a"
    assert all(len(j["replies"]) == 2 and all("Verdict" in r for r in j["replies"]) for j in judgments)
    assert (tmp_path / "out" / "report.png").stat().st_size > 5_000
    printed = capsys.readouterr().out
    assert "model-a wins 4 vs model-b 1, 2 ties" in printed and "writing" in printed and "71.4%" in printed
    written = "".join(p.read_text() for p in (tmp_path / "out").glob("*.json*"))
    assert "sk-test-judge-secret" not in written


def test_a_judge_that_always_says_A_gives_only_ties_and_full_position_bias(answers, tmp_path):
    with ScriptedOpenAI(default=lambda body: Canned("The first one. [[A]]")) as server:
        assert judge(server, answers, tmp_path / "out") == 0
    report, judgments = read_outputs(tmp_path / "out")
    assert (report["wins_a"], report["wins_b"], report["ties"]) == (0, 0, 7)
    assert report["position_bias"] == {"rate": 1.0, "first_both_times": 7, "second_both_times": 0}
    assert report["win_rate_a"] == 0.5 and all(j["verdicts"] == ["A", "A"] for j in judgments)


def test_the_both_orders_rule():
    assert combine("A", "B") == "a" and combine("B", "A") == "b" and combine("C", "C") == "tie"
    assert combine("A", "A") == "tie" and combine("B", "B") == "tie"  # followed the position
    assert combine("A", "C") == "tie" and combine("C", "A") == "tie"  # a win in one order only


def test_unparseable_replies_are_asked_again_once_then_scored_as_ties(answers, tmp_path):
    def mumbling(body):
        first, second = shown(body)
        return Canned("I cannot decide between them.") if "5" in first else fair(body)

    script = [Canned("Both have merits.")]  # the very first request: no verdict, asked again
    with ScriptedOpenAI(default=mumbling, script=script) as server:
        assert judge(server, answers, tmp_path / "out", "concurrency=1", "max_unparseable=0.2") == 0
    report, judgments = read_outputs(tmp_path / "out")
    # 14 judgments + 1 retry of the first + 2 retries for item 5 (both orders, asked twice each)
    assert len(server.received) == 17
    item5 = next(j for j in judgments if j["id"] == "5")
    assert item5["verdicts"] == ["C", "C"] and item5["unparseable"] == 4 and item5["winner"] == "tie"
    assert judgments[0]["unparseable"] == 1 and judgments[0]["winner"] == "a"
    assert report["unparseable_replies"] == 5 and (report["wins_a"], report["wins_b"], report["ties"]) == (4, 1, 2)


@pytest.mark.slow
def test_429_and_500_are_retried_by_the_client(answers, tmp_path):
    script = [Fault(status=429, retry_after="0"), Fault(status=500), Fault(status=503)]
    with ScriptedOpenAI(default=fair, script=script) as server:
        assert judge(server, answers, tmp_path / "out", "concurrency=1", "max_retries=3") == 0
    report, _ = read_outputs(tmp_path / "out")
    assert len(server.received) == 17 and report["usage"]["retries"] == 3 and report["usage"]["failed_request"] == 0
    assert report["complete"] and (report["wins_a"], report["wins_b"], report["ties"]) == (4, 1, 2)


def test_a_judge_that_keeps_failing_stops_resumably(answers, tmp_path, capsys):
    with ScriptedOpenAI(default=lambda body: Fault(status=500)) as server:
        assert judge(server, answers, tmp_path / "out", "max_retries=0", "concurrency=2") == 1
    assert "the last error: 500 scripted 500" in capsys.readouterr().err
    with ScriptedOpenAI(default=fair) as server:
        assert judge(server, answers, tmp_path / "out") == 0
    assert len(server.received) == 14 and read_outputs(tmp_path / "out")[0]["complete"]


def test_the_cache_a_rerun_costs_nothing_and_a_changed_answer_is_judged_alone(answers, tmp_path, capsys):
    with ScriptedOpenAI(default=fair) as server:
        assert judge(server, answers, tmp_path / "out") == 0
        first, _ = read_outputs(tmp_path / "out")
        assert judge(server, answers, tmp_path / "out") == 0
        assert len(server.received) == 14  # the rerun made no request
        again, _ = read_outputs(tmp_path / "out")
        assert again["usage"]["requests_this_run"] == 0 and again["usage"]["cost_usd"] == first["usage"]["cost_usd"]
        tallies = ("wins_a", "wins_b", "ties")
        assert [again[k] for k in tallies] == [first[k] for k in tallies]
        b = answers[1]
        lines = b.read_text().splitlines()
        changed = json.loads(lines[2])
        changed["output"] = "GOOD 2 now"
        lines[2] = json.dumps(changed)
        b.write_text("\n".join(lines) + "\n")
        assert judge(server, answers, tmp_path / "out") == 0
    assert len(server.received) == 16  # only the changed pair, in both orders
    assert {shown(r["body"])[0] for r in server.received[14:]} == {"GOOD 2", "GOOD 2 now"}
    report, judgments = read_outputs(tmp_path / "out")
    assert (report["wins_a"], report["ties"]) == (3, 3) and report["usage"]["requests_this_run"] == 2


def test_max_cost_stops_before_the_spend_would_pass_it_and_a_rerun_continues(answers, tmp_path):
    # At $1000 per million tokens a judgment of ~50 tokens (as the fake server counts them) costs about $0.05.
    prices = ["price_input=1000", "price_output=1000"]
    with ScriptedOpenAI(default=fair) as server:
        assert judge(server, answers, tmp_path / "out", "max_cost=0.3", *prices) == 3  # stopped, not finished
        report, judgments = read_outputs(tmp_path / "out")
        per_request = report["usage"]["cost_usd"] / report["usage"]["requests"]
        assert report["stop_reason"] == "max_cost" and not report["complete"]
        assert report["usage"]["cost_usd"] <= 0.3 < report["usage"]["cost_usd"] + per_request
        assert 1 <= report["pairs"] == len(judgments) < 7
        assert judge(server, answers, tmp_path / "out", "max_cost=100", *prices) == 0
    assert len(server.received) == 14 and read_outputs(tmp_path / "out")[0]["complete"]


def test_max_cost_needs_a_price_and_nothing_is_sent_without_one(answers, tmp_path, capsys):
    with ScriptedOpenAI(default=fair) as server:
        with pytest.raises(SystemExit) as stopped:
            main(["judge", f"a={answers[0]}", f"b={answers[1]}", "judge_model=my-local-judge",
                  f"base_url={server.base_url}", "max_cost=1", f"output_dir={tmp_path / 'out'}"])
    assert stopped.value.code == 2 and server.received == []
    assert "max_cost needs a price for model 'my-local-judge'" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["judge_model=x"], "error: key 'a' must be set\nerror: key 'b' must be set"),
    (["a=A", "b=B"], "key 'judge_model' must be set"),
    (["a=A", "b=B", "judge=oracle"], "key 'judge' must be one of llm, reference"),
    (["a=nowhere.jsonl", "b=B", "judge_model=x"], "nowhere.jsonl: no such answers file"),
])
def test_bad_judge_arguments_are_one_line_each(arguments, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["judge", *arguments])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and message in err
    assert all(line.startswith("error: ") for line in err.splitlines())  # every problem, a line each


@pytest.mark.slow
def test_sigkill_mid_run_loses_nothing_and_judges_nothing_twice(tmp_path):
    outputs = [f"GOOD {i}" if i % 3 else f"BAD {i}" for i in range(30)]
    a = write_answers(tmp_path / "a.jsonl", "model-a", outputs)
    b = write_answers(tmp_path / "b.jsonl", "model-b", [f"GOOD {i}b" for i in range(30)])
    out = tmp_path / "out"
    journal = out / "judge.journal.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

    def verdicts():
        lines = journal.read_text().splitlines() if journal.exists() else []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # the torn line of the kill
        return [e["hash"] for e in entries if e.get("verdict")]

    def slow_fair(body):
        reply = fair(body)
        reply.delay = 0.1
        return reply

    with ScriptedOpenAI(default=slow_fair) as server:
        command = [sys.executable, "-m", "alpaca_lora.evaluate", "judge", f"a={a}", f"b={b}", "judge_model=gpt-4o-mini",
                   f"base_url={server.base_url}", f"output_dir={out}", "concurrency=3"]
        for kill_after in (8, 30):
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while len(verdicts()) < kill_after and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.wait()
            assert process.returncode == -signal.SIGKILL  # it was still running: a real mid-run kill
        before = verdicts()
        final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    after = verdicts()
    assert len(after) == len(set(after)) == 60 and after[:len(before)] == before
    assert len(server.received) <= 60 + 2 * 3  # at most the requests in flight at each kill were asked again
    report, judgments = read_outputs(out)
    assert report["complete"] and len(judgments) == 30 and (report["wins_a"], report["wins_b"]) == (0, 10)


def test_mine_against_text_davinci_003_as_alpaca_compared_itself(shared_data, tmp_path, seed_download):
    """``judge a=mine.jsonl b=text-davinci-003``: the published answers, paired with ours item by item."""
    from alpaca_lora.evaluate.answers import published_url
    from alpaca_lora.evaluate.sets import load_eval_set

    seed_download(published_url("text-davinci-003"), shared_data / "text_davinci_003_predictions.jsonl")
    items = load_eval_set(str(shared_data / "user_oriented_instructions.jsonl")).items[:5]
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({**item, "output": "GOOD answer", "generator": "mine"}) + "\n"
                            for item in items))
    with ScriptedOpenAI(default=fair) as server:
        assert main(["judge", f"a={mine}", "b=text-davinci-003", "judge_model=gpt-4o-mini",
                     f"base_url={server.base_url}", f"output_dir={tmp_path / 'out'}"]) == 0
    report, judgments = read_outputs(tmp_path / "out")
    assert (report["a"], report["b"], report["pairs"], report["wins_a"]) == ("mine", "text-davinci-003", 5, 5)
    assert set(report["per_category"]) == {item["category"] for item in items}
    assert judgments[0]["output_b"].startswith("Have questions about my rate?") and len(server.received) == 10


def test_identical_responses_are_a_tie_without_a_request(tmp_path):
    a = write_answers(tmp_path / "a.jsonl", "model-a", ["GOOD 0", "same words"])
    b = write_answers(tmp_path / "b.jsonl", "model-b", ["BAD 0", "same words"])
    with ScriptedOpenAI(default=fair) as server:
        assert judge(server, (a, b), tmp_path / "out") == 0
    report, judgments = read_outputs(tmp_path / "out")
    assert len(server.received) == 2 and all("same words" not in shown(r["body"]) for r in server.received)
    assert report["complete"] and (report["wins_a"], report["ties"]) == (1, 1)
    assert judgments[1]["identical"] and judgments[1]["winner"] == "tie"


def test_a_judge_endpoint_answering_html_is_a_failure_not_a_tie_and_the_rerun_after_the_fix_completes(
        answers, tmp_path, capsys):
    """Issue 22: a 200 whose body is ``<html>oops</html>`` was scored as a tie, then the run died of a
    ZeroDivisionError, and so did every rerun, the endpoint fixed or not."""
    with ScriptedOpenAI(default=lambda body: Fault(body="<html>oops</html>")) as server:
        assert judge(server, answers, tmp_path / "out", "max_retries=0") == 1
    err = capsys.readouterr().err
    assert "failed requests in a row" in err and "not an OpenAI response" in err
    assert not (tmp_path / "out" / "report.json").exists()  # no pair was judged: no report of made-up ties
    with ScriptedOpenAI(default=fair) as server:
        assert judge(server, answers, tmp_path / "out") == 0
    report, judgments = read_outputs(tmp_path / "out")
    assert len(server.received) == 14 and report["complete"]
    assert (report["wins_a"], report["wins_b"], report["ties"]) == (4, 1, 2) and report["unparseable_replies"] == 0


def test_a_judge_that_never_gives_a_verdict_says_so_loudly_and_exits_non_zero(answers, tmp_path, capsys):
    """Issue 22: 104 replies without a verdict made a "complete" report of ties and exit 0."""
    with ScriptedOpenAI(default=lambda body: Canned("Both responses have their merits.")) as server:
        assert judge(server, answers, tmp_path / "out") == 4
    report, judgments = read_outputs(tmp_path / "out")
    assert len(server.received) == 28 and report["ties"] == 7  # every judgment asked twice, then a tie
    assert report["no_verdict"] == {"judgments": 14, "of": 14, "share": 1.0, "max_unparseable": 0.1}
    printed = capsys.readouterr()
    assert "warning: 14 of 14 judgments (100.0%) got no verdict" in printed.err and "max_unparseable=0.1" in printed.err
    assert "no verdict: 14 of 14 judgments (counted as ties)" in printed.out


def test_the_cost_is_estimated_before_the_first_request_and_one_past_max_cost_is_never_sent(tmp_path, capsys):
    """Issue 22: a 50 MB answers file sent 80 prompts of 1.25 MB each to a paid judge without a word, and max_cost
    let the first request through unpriced."""
    long = "word " * 20_000  # 100,000 characters an answer: about 25,000 tokens at 4 characters a token
    a = write_answers(tmp_path / "a.jsonl", "model-a", [f"GOOD {i} {long}" for i in range(3)])
    b = write_answers(tmp_path / "b.jsonl", "model-b", [f"BAD {i} {long}" for i in range(3)])
    prices = ["price_input=100", "price_output=100"]  # USD per million tokens: about $5 a request
    with ScriptedOpenAI(default=fair) as server:
        assert judge(server, (a, b), tmp_path / "out", "max_cost=3", *prices) == 3
        assert server.received == []
        err = capsys.readouterr().err
        assert re.search(r"warning: 6 requests to send, about 30\d,\d{3} prompt tokens .*the longest prompt about "
                         r"50,\d{3}\), estimated \$30\.\d\d for the prompts alone: over max_cost=\$3\.00", err)
        assert "the next request (about 50," in err and "not sent" in err
        assert judge(server, (a, b), tmp_path / "out", *prices) == 0
    assert len(server.received) == 6 and "estimated $30" in capsys.readouterr().err


def judgment_cache() -> Path:
    return Path(os.environ["ALPACA_LORA_CACHE"]) / "judge" / "judgments.sqlite"


@pytest.mark.slow
def test_judgments_are_shared_across_output_directories_and_the_swapped_pair_costs_nothing(answers, tmp_path):
    """Issue 21: judging the same pairs into another output_dir cost 28 new requests for 12 pairs."""
    a, b = answers
    with ScriptedOpenAI(default=fair) as server:
        assert judge(server, answers, tmp_path / "dir1") == 0
        assert len(server.received) == 14
        assert judge(server, answers, tmp_path / "dir2") == 0
        assert judge(server, (b, a), tmp_path / "dir3") == 0  # B vs A: the same prompts, the other way round
        assert len(server.received) == 14  # zero new requests
        assert judge(server, answers, tmp_path / "dir4", "shared_cache=false") == 0
        assert len(server.received) == 28  # without the shared cache: judged again
    first, again, swapped = (read_outputs(tmp_path / d)[0] for d in ("dir1", "dir2", "dir3"))
    tallies = ("wins_a", "wins_b", "ties")
    assert [again[k] for k in tallies] == [first[k] for k in tallies] == [4, 1, 2]
    assert [swapped[k] for k in tallies] == [1, 4, 2] and swapped["complete"]
    assert again["usage"]["requests_this_run"] == 0 and again["usage"]["from_cache"] == 14
    journal = [json.loads(line) for line in (tmp_path / "dir2" / "judge.journal.jsonl").read_text().splitlines()]
    assert len(journal) == 14 and all(entry["cached"] and entry["verdict"] for entry in journal)  # the run's record
    with ScriptedOpenAI(default=fair) as server:
        assert judge(server, answers, tmp_path / "dir2") == 0  # its own journal suffices, the cache aside
    assert server.received == []


def test_a_corrupt_cache_entry_is_skipped_and_reported_and_a_corrupt_cache_file_set_aside(answers, tmp_path, capsys):
    import sqlite3

    with ScriptedOpenAI(default=fair) as server:
        assert judge(server, answers, tmp_path / "dir1") == 0
        with sqlite3.connect(judgment_cache()) as db:
            key, reply = db.execute("SELECT key, reply FROM judgments WHERE verdict = 'A' LIMIT 1").fetchone()
            db.execute("UPDATE judgments SET verdict = 'B', reply = ? WHERE key = ?", (reply.replace("[[A]]", "[[B]]"),
                                                                                         key))
        capsys.readouterr()
        assert judge(server, answers, tmp_path / "dir2") == 0
        assert len(server.received) == 15  # the tampered judgment alone was asked again
        assert "1 cached judgment failed its check and was skipped" in capsys.readouterr().err
        assert read_outputs(tmp_path / "dir2")[0]["wins_a"] == 4
        judgment_cache().write_bytes(b"this is not a database" * 100)
        assert judge(server, answers, tmp_path / "dir3") == 0
        assert len(server.received) == 29
        err = capsys.readouterr().err
        assert "is not a readable judgment cache" in err and "set aside as" in err
        assert list(judgment_cache().parent.glob("judgments.sqlite.corrupt-*"))
        assert judge(server, answers, tmp_path / "dir4") == 0  # the new cache has them all again
        assert len(server.received) == 29


@pytest.mark.slow
def test_two_judges_running_at_once_share_the_cache_safely(tmp_path):
    """Two processes judging different pairs into one cache at the same time: nothing lost, nothing corrupt."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    runs = []
    for name in ("x", "y"):
        a = write_answers(tmp_path / f"{name}-a.jsonl", "model-a", [f"GOOD {name} {i}" for i in range(12)])
        b = write_answers(tmp_path / f"{name}-b.jsonl", "model-b", [f"BAD {name} {i}" for i in range(12)])
        runs.append((a, b))
    with ScriptedOpenAI(default=fair) as server:
        commands = [[sys.executable, "-m", "alpaca_lora.evaluate", "judge", f"a={a}", f"b={b}",
                     "judge_model=gpt-4o-mini", f"base_url={server.base_url}", f"output_dir={tmp_path / str(i)}",
                     "concurrency=4"] for i, (a, b) in enumerate(runs)]
        processes = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for command in commands]
        for process in processes:
            assert process.wait(timeout=300) == 0, process.stderr.read()
        assert len(server.received) == 48
        for i, (a, b) in enumerate(runs):
            assert judge(server, (a, b), tmp_path / f"again{i}") == 0
        assert len(server.received) == 48
