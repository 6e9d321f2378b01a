// A TEST identity provider for the single sign-on tests, NOT for production: the OpenID
// Provider logic is the certified `oidc-provider` library; this file only gives it one client
// (the tracking server), a fixed list of test users with a `groups` claim, and a plain login
// form. Signing keys and cookie keys are made at start and live in memory only.
//
// Settings (environment, all required):
//   ISSUER          the URL both the browser and the tracking server use, e.g. http://oidc.test:8461
//   PORT            the port to listen on (the issuer's port: it is published unchanged)
//   CLIENT_ID / CLIENT_SECRET / REDIRECT_URI   the tracking server's client registration
//   TEST_USERS      JSON: [{"login", "password", "email", "name", "groups": [...]}, ...]
import crypto from 'node:crypto';
import { exportJWK, generateKeyPair } from 'jose';
import Provider from 'oidc-provider';

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`test-oidc-provider: ${name} is not set`);
    process.exit(2);
  }
  return value;
}

const issuer = required('ISSUER');
const port = Number(required('PORT'));
const users = new Map(JSON.parse(required('TEST_USERS')).map((user) => [user.login, user]));

function sameSecret(given, expected) {
  const a = crypto.createHash('sha256').update(String(given)).digest();
  const b = crypto.createHash('sha256').update(String(expected)).digest();
  return crypto.timingSafeEqual(a, b);
}

async function findAccount(ctx, id) {
  const user = users.get(id);
  if (!user) return undefined;
  return {
    accountId: id,
    async claims() {
      return {
        sub: id,
        email: user.email,
        email_verified: true,
        name: user.name,
        preferred_username: id,
        groups: user.groups,
      };
    },
  };
}

const { privateKey } = await generateKeyPair('RS256', { extractable: true });
const signingKey = { ...(await exportJWK(privateKey)), kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };

const provider = new Provider(issuer, {
  clients: [{
    client_id: required('CLIENT_ID'),
    client_secret: required('CLIENT_SECRET'),
    redirect_uris: [required('REDIRECT_URI')],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  }],
  findAccount,
  jwks: { keys: [signingKey] },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  // Put the scopes' claims (groups among them) in the ID token, as Keycloak and Entra ID do.
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  pkce: { required: () => true },
});

const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginPage(uid, message) {
  return `<!doctype html><html><head><title>Test identity provider: sign in</title></head><body>
<h1>Test identity provider</h1>
${message ? `<p id="error">${escapeHtml(message)}</p>` : ''}
<form method="post" action="/interaction/${escapeHtml(uid)}/login">
  <label>Username <input name="login" autocomplete="username" required></label>
  <label>Password <input name="password" type="password" autocomplete="current-password" required></label>
  <button type="submit" id="sign-in">Sign in</button>
</form></body></html>`;
}

async function formBody(req) {
  let raw = '';
  for await (const chunk of req) {
    raw += chunk;
    if (raw.length > 16384) throw new Error('form too large');
  }
  return new URLSearchParams(raw);
}

// The tracking server is a first-party client: its scopes are granted without a consent page.
async function grantRequested(details) {
  const { prompt: { details: missing }, params, session } = details;
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  if (missing.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  return grant.save();
}

provider.use(async (ctx, next) => {
  const match = ctx.path.match(/^\/interaction\/([\w-]+)(\/login)?$/);
  if (!match) return next();
  ctx.set('Cache-Control', 'no-store');
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (details.prompt.name === 'consent') {
    const grantId = await grantRequested(details);
    return provider.interactionFinished(ctx.req, ctx.res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  }
  if (ctx.method === 'GET' && !match[2]) {
    ctx.type = 'html';
    ctx.body = loginPage(details.uid);
    return undefined;
  }
  if (ctx.method === 'POST' && match[2]) {
    const form = await formBody(ctx.req);
    const user = users.get(form.get('login') || '');
    if (!user || !sameSecret(form.get('password') || '', user.password)) {
      ctx.status = 401;
      ctx.type = 'html';
      ctx.body = loginPage(details.uid, 'Unknown user or wrong password.');
      return undefined;
    }
    return provider.interactionFinished(ctx.req, ctx.res, { login: { accountId: user.login } },
      { mergeWithLastSubmission: false });
  }
  ctx.status = 405;
  return undefined;
});

provider.listen(port, () => console.log(`test-oidc-provider: issuer ${issuer}, listening on ${port}`));
