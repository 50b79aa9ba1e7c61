// Mistakes the declarations must catch: each line below is a type error, and
// `@ts-expect-error` makes tsc fail if it is NOT one (so `any`-typed declarations fail too).
import { ChatClient, compareIds, STATES } from '../../../gateway/static/client.js';

// @ts-expect-error userId is required
new ChatClient({ userName: 'x' });
// @ts-expect-error unknown option
new ChatClient({ userId: 'u', heartbeat: 5 });
// @ts-expect-error token is a string
new ChatClient({ userId: 'u', token: 42 });
// @ts-expect-error refreshToken returns a Promise<string>
new ChatClient({ userId: 'u', refreshToken: () => 'tok' });

const chat = new ChatClient({ userId: 'u', token: 'jwt', refreshToken: async () => 'fresh' });
// @ts-expect-error no such event
chat.on('mesage', () => {});
// @ts-expect-error a message handler gets a ChatMessage, whose content is a string
chat.on('message', (m) => m.content.toFixed(1));
// @ts-expect-error a room id is a number or a string
chat.send({ id: 1 }, 'hi');
// @ts-expect-error content is a string
chat.send(1, 42);
// @ts-expect-error ids are strings
compareIds(1, 2);
// @ts-expect-error the states are fixed
const s: typeof STATES.CONNECTED = 'online';
void s;
// @ts-expect-error state is read-only
chat.state = 'closed';
