"""Open Inference Protocol requests built, and answers read, by Triton's own HTTP client
library, for the in-process serving app."""

import asyncio

import tritonclient.http as triton
from serving_helpers import call


def triton_request(array, binary_input=True, binary_output=True, datatype="FP32", name="inputs"):
    """(body, headers) exactly as tritonclient's InferenceServerClient.infer sends them."""
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary_input)
    output = triton.InferRequestedOutput("predictions", binary_data=binary_output)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor], outputs=[output],
                                                                             request_id="req-7")
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    return body, headers


def infer(app, body, headers=None, path=None):
    return asyncio.run(call(app, "POST", path or f"/v2/models/{app.settings.model_name}/infer", body,
                            headers or {}))


def result(response):
    length = response.headers.get("inference-header-content-length")
    return triton.InferResult.from_response_body(response.body, header_length=int(length) if length else None)
