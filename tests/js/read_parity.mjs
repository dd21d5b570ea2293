// Runs Clerk's common reads through @clerk/backend against each side named in the config
// (argv[2], JSON: {sides: {name: {apiUrl, secretKey}}, orgId, orgSlug, userId, inviteeId})
// and prints {call: {side: {ok: result} | {error: status, codes: [...]}}} as JSON.
import { createClerkClient } from '@clerk/backend';

const config = JSON.parse(process.argv[2]);

// The SDK's resource objects keep the raw JSON beside the parsed fields: compare the parsed ones.
const plain = (value) => JSON.parse(JSON.stringify(value, (key, item) => (key === '_raw' ? undefined : item)));

const calls = {
  'organizations': (c) => c.organizations.getOrganizationList(),
  'organizations paged by name with counts': (c) =>
    c.organizations.getOrganizationList({ limit: 2, offset: 1, orderBy: '+name', includeMembersCount: true }),
  'organizations by query': (c) => c.organizations.getOrganizationList({ query: 'a', orderBy: '-created_at' }),
  'organization by id': (c) => c.organizations.getOrganization({ organizationId: config.orgId }),
  'organization by slug': (c) => c.organizations.getOrganization({ slug: config.orgSlug, includeMembersCount: true }),
  'memberships': (c) => c.organizations.getOrganizationMembershipList({ organizationId: config.orgId, limit: 100 }),
  'memberships paged by email': (c) =>
    c.organizations.getOrganizationMembershipList({
      organizationId: config.orgId,
      limit: 3,
      offset: 3,
      orderBy: 'email_address',
    }),
  'memberships by role': (c) =>
    c.organizations.getOrganizationMembershipList({ organizationId: config.orgId, role: ['org:billing'] }),
  'memberships by query': (c) =>
    c.organizations.getOrganizationMembershipList({ organizationId: config.orgId, query: 'ar' }),
  'memberships of the instance': (c) => c.organizations.getInstanceOrganizationMembershipList({ limit: 100 }),
  'memberships of a user': (c) => c.users.getOrganizationMembershipList({ userId: config.userId }),
  'invitations': (c) => c.organizations.getOrganizationInvitationList({ organizationId: config.orgId }),
  'invitations pending or revoked': (c) =>
    c.organizations.getOrganizationInvitationList({ organizationId: config.orgId, status: ['pending', 'revoked'] }),
  'invitations of a user': (c) => c.users.getOrganizationInvitationList({ userId: config.inviteeId }),
  'unknown organization': (c) => c.organizations.getOrganization({ organizationId: 'org_none' }),
};

const results = {};
for (const [name, call] of Object.entries(calls)) {
  results[name] = {};
  for (const [side, options] of Object.entries(config.sides)) {
    const client = createClerkClient({ secretKey: options.secretKey, apiUrl: options.apiUrl });
    try {
      results[name][side] = { ok: plain(await call(client)) };
    } catch (error) {
      results[name][side] = {
        error: error.status ?? String(error),
        codes: (error.errors ?? []).map((item) => item.code),
      };
    }
  }
}
process.stdout.write(JSON.stringify(results));
