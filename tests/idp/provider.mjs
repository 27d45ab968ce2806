// A real OpenID provider (npm oidc-provider) for Wicket's end-to-end tests.
//
//   PORT=NNNN node provider.mjs
//
// Issues JWT access tokens for the resource `urn:wicket:control` with
// audience `wicket`, through client credentials (agents and admin robots).
// The `groups` claim comes from the client's registration.
import Provider from 'oidc-provider';

const port = Number(process.env.PORT || 0);
const issuer = `http://127.0.0.1:${port}`;
const resource = 'urn:wicket:control';

const clients = [
  { client_id: 'agent-bot', client_secret: 'agent-bot-secret', groups: ['agents'] },
  { client_id: 'admin-bot', client_secret: 'admin-bot-secret', groups: ['wicket-admins'] },
  { client_id: 'approver-bot', client_secret: 'approver-bot-secret', groups: ['wicket-approvers'] },
];
const groupsOf = new Map(clients.map((c) => [c.client_id, c.groups]));

const provider = new Provider(issuer, {
  clients: clients.map(({ client_id, client_secret }) => ({
    client_id,
    client_secret,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
  })),
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, indicator) => {
        if (indicator !== resource) throw new Error(`unknown resource ${indicator}`);
        return {
          scope: 'wicket',
          audience: 'wicket',
          accessTokenTTL: 600,
          accessTokenFormat: 'jwt',
        };
      },
    },
  },
  extraTokenClaims: (_ctx, token) => ({ groups: groupsOf.get(token.clientId) || [] }),
});

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.close(() => process.exit(0)));
}
