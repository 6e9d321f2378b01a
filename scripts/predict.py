#!/usr/bin/env python3
"""Reads a request body {"inputs": [...], "labels": [...]} on stdin, sends the images to the
model endpoint and prints each prediction beside the true label. Standard library only, so
it runs on any host with Python 3."""

import argparse
import json
import sys
import urllib.error
import urllib.request

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="the /invocations URL")
    args = parser.parse_args()
    text = sys.stdin.read()
    if not text.strip():
        # The command feeding us failed and has said why on stderr, just above.
        print("no test images to send (see the line above)", file=sys.stderr)
        return 1
    try:
        sample = json.loads(text)
        images = sample["inputs"]
    except (ValueError, KeyError, TypeError):
        print('expected {"inputs": [...], "labels": [...]} on stdin (from python -m trainer.sample)',
              file=sys.stderr)
        return 2
    body = json.dumps({"inputs": images}).encode()
    request = urllib.request.Request(args.url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            version = response.headers.get("X-Model-Version", "?")
            predictions = json.load(response)["predictions"]
    except (ValueError, KeyError) as error:
        print(f"{args.url} answered something other than MLflow predictions: {error}", file=sys.stderr)
        return 1
    except urllib.error.HTTPError as error:
        print(f"{args.url} answered {error.code}: {error.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except urllib.error.URLError as error:
        print(f"could not reach {args.url}: {error.reason} (is the stack up? make ps)", file=sys.stderr)
        return 1
    print(f"model version {version}")
    for scores, label in zip(predictions, sample.get("labels", [None] * len(predictions))):
        best = max(range(len(scores)), key=scores.__getitem__)
        truth = f"   (true: {CLASSES[label]})" if label is not None else ""
        print(f"  {CLASSES[best]:<12} {scores[best]:.3f}{truth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
