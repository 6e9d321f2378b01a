// Healthy once the discovery document is served under the configured issuer.
const response = await fetch(`http://127.0.0.1:${process.env.PORT}/.well-known/openid-configuration`)
  .catch((error) => ({ ok: false, status: error.message }));
process.exit(response.ok && (await response.json()).issuer === process.env.ISSUER ? 0 : 1);
