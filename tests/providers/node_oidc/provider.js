// node oidc-provider on loopback, for tests/test_real_provider.py through tests/providers/node_oidc.py.
//
//     node provider.js CONFIG.json
//
// CONFIG (written by the harness): {"issuer": "http://127.0.0.1:PORT/oidc", "port": PORT,
// "admin_port": PORT2, "clients": [client metadata...], "access_token_ttl": s,
// "refresh_token_ttl": s, "rotate_refresh_tokens": bool, "clock_tolerance": s}.
//
// The issuer has a path prefix: this plain http server strips it before oidc-provider sees the
// request and keeps the full path in req.originalUrl, which is how oidc-provider learns where it
// is mounted. Everything under the prefix is oidc-provider's own code and policy; this file only
// configures it and counts what it did.
//
// The admin port (a second server, never the issuer's) answers what the provider itself saw:
//   GET  /counts   every token request by grant_type and outcome ("success" or the OAuth error),
//                  every request by route and HTTP status, refresh tokens consumed (rotated),
//                  grants revoked, the detail of each token error, in order.
//   POST /inspect  {"refresh_token"?, "access_token"?, "grant_id"?}: what the provider holds for
//                  each (found, consumed, expired, grant id, grant active). Test-only.
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';

import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const HOST = '127.0.0.1';
const prefix = new URL(config.issuer).pathname.replace(/\/$/, '');

// A signing key of this run (the library's default development key prints a warning and is the
// same everywhere).
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', use: 'sig', alg: 'RS256' };

const provider = new Provider(config.issuer, {
  clients: config.clients,
  jwks: { keys: [signingKey] },
  // Any login name is an account whose subject is that name (the dev login form asks for one).
  async findAccount(ctx, sub) {
    return { accountId: sub, async claims() { return { sub }; } };
  },
  scopes: ['openid', 'offline_access'],
  claims: { openid: ['sub'] },
  features: {
    devInteractions: { enabled: true }, // oidc-provider's own login and consent forms
    revocation: { enabled: true },
    userinfo: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
  // true: every refresh consumes its refresh token and issues a new one; oidc-provider treats a
  // consumed refresh token presented again as theft and revokes the whole grant. false: the same
  // refresh token is returned and stays usable.
  rotateRefreshToken: config.rotate_refresh_tokens,
  // Refresh tokens are issued for offline_access only (oidc-provider's default issueRefreshToken),
  // which in turn needs prompt=consent in the authorization request.
  ttl: {
    AccessToken: config.access_token_ttl,
    AuthorizationCode: 60,
    IdToken: 3600,
    RefreshToken: config.refresh_token_ttl,
    Grant: config.refresh_token_ttl,
    Session: 3600,
    Interaction: 600,
  },
  // oidc-provider accepts an expired token for clockTolerance seconds (15 by default) after its
  // exp: the harness passes 0 unless asked, so that a token is dead when its expires_in says.
  clockTolerance: config.clock_tolerance,
  cookies: { keys: ['node-oidc-test-cookie-key'] },
});

// -- what the provider saw --------------------------------------------------------------------

const counts = {
  token: {}, // grant_type -> outcome -> n
  requests: {}, // route -> status -> n
  refresh_tokens_consumed: 0,
  grants_revoked: 0,
  revoked_grant_ids: [],
  token_errors: [], // {grant_type, error, detail, status}, in order
  server_errors: 0,
};

function bump(table, key, outcome) {
  table[key] ??= {};
  table[key][outcome] = (table[key][outcome] ?? 0) + 1;
}

// Emitted before koa writes the response: a client that has its answer sees it counted.
provider.on('grant.success', (ctx) => bump(counts.token, ctx.oidc.params.grant_type, 'success'));
provider.on('grant.error', (ctx, err) => {
  const grantType = ctx.oidc?.params?.grant_type ?? 'unknown';
  bump(counts.token, grantType, err.error ?? 'unknown');
  counts.token_errors.push({
    grant_type: grantType,
    error: err.error,
    detail: err.error_detail ?? err.error_description,
    status: err.statusCode ?? err.status,
  });
});
provider.on('refresh_token.consumed', () => { counts.refresh_tokens_consumed += 1; });
provider.on('grant.revoked', (ctx, grantId) => {
  counts.grants_revoked += 1;
  counts.revoked_grant_ids.push(grantId);
});
provider.on('server_error', (ctx, err) => {
  counts.server_errors += 1;
  console.error('server_error', err);
});
provider.use(async (ctx, next) => {
  await next();
  if (ctx.oidc?.route) bump(counts.requests, ctx.oidc.route, String(ctx.status));
});

async function inspect(query) {
  const out = {};
  if (query.refresh_token) {
    const token = await provider.RefreshToken.find(query.refresh_token, { ignoreExpiration: true });
    out.refresh_token = token
      ? { found: true, consumed: !!token.consumed, expired: token.isExpired, grant_id: token.grantId }
      : { found: false };
  }
  if (query.access_token) {
    const token = await provider.AccessToken.find(query.access_token, { ignoreExpiration: true });
    out.access_token = token
      ? { found: true, expired: token.isExpired, grant_id: token.grantId }
      : { found: false };
  }
  const grantId = query.grant_id ?? out.refresh_token?.grant_id;
  if (grantId) {
    const grant = await provider.Grant.find(grantId, { ignoreExpiration: true });
    out.grant = { id: grantId, active: !!grant && !grant.isExpired };
  }
  return out;
}

// -- servers ----------------------------------------------------------------------------------

const oidc = provider.callback();
const issuerServer = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (path !== prefix && !path.startsWith(`${prefix}/`)) {
    res.writeHead(404).end();
    return;
  }
  req.originalUrl = req.url; // where oidc-provider reads its mount path from
  req.url = req.url.slice(prefix.length) || '/';
  oidc(req, res);
});

function json(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
}

const adminServer = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/counts') {
    json(res, 200, counts);
  } else if (req.method === 'POST' && req.url === '/inspect') {
    let body = '';
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      inspect(JSON.parse(body || '{}'))
        .then((out) => json(res, 200, out))
        .catch((err) => json(res, 500, { error: String(err) }));
    });
  } else {
    json(res, 404, { error: 'not found' });
  }
});

issuerServer.listen(config.port, HOST);
adminServer.listen(config.admin_port, HOST);
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
